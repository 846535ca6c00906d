// Errors: user errors (bad config, data, checkpoint, environment) are values with a message that
// names the file/key/record and says what to do; main turns them into exit code 2. Internal
// invariants are assertions that always run (RT_ASSERT), and library calls are checked by macros
// that name the call site.
#pragma once
#include <stdexcept>
#include <string>

namespace ranktune {

// A problem the user can fix. Exit code 2.
class UserError : public std::runtime_error {
 public:
  explicit UserError(const std::string& what) : std::runtime_error(what) {}
};

// Exit code used when a run stops for preemption and should be requeued.
inline constexpr int kExitRequeue = 75;
inline constexpr int kExitUserError = 2;

[[noreturn]] void assert_fail(const char* cond, const char* file, int line, const std::string& msg);

}  // namespace ranktune

#define RT_ASSERT(cond, msg)                                                  \
  do {                                                                        \
    if (!(cond)) ::ranktune::assert_fail(#cond, __FILE__, __LINE__, (msg));   \
  } while (0)

// Throws UserError with the message when the condition fails.
#define RT_REQUIRE(cond, msg)                                \
  do {                                                       \
    if (!(cond)) throw ::ranktune::UserError(msg);           \
  } while (0)
