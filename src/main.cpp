#include <cstdio>
int main() { std::puts("ranktune"); return 0; }
