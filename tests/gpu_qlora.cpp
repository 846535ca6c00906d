// QLoRA on the GPU: the NF4 base (dequantized by kernels/nf4.cu right before each GEMM) against
// bf16 LoRA on the quickstart task, from a base trained from scratch to the quickstart's accuracy.
#include <gtest/gtest.h>

#include <cmath>

#include "gpu_skip.h"
#include "qlora_quickstart.h"

TEST(GpuQLoRA, QuickstartTaskEndsWithinTwoPercentOfBf16Lora) {
  SKIP_WITHOUT_GPU();
  const auto [lora, qlora] = lora_and_qlora_losses(fresh_temp_dir("gpu_qlora_quickstart"), "cuda:0", 1500, 600);
  EXPECT_LT(lora, 0.5);
  EXPECT_LT(std::fabs(qlora - lora) / lora, 0.02);
}
