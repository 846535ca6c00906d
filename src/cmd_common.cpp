#include <algorithm>

#include "ranktune/cli.h"
#include "ranktune/error.h"

namespace ranktune {

bool wants_help(const Args& args) {
  return std::any_of(args.begin(), args.end(), [](const std::string& a) { return a == "--help" || a == "-h"; });
}

ConfigArgs parse_config_args(const Args& args, const std::string& command,
                             const std::vector<std::string>& flags_with_value,
                             const std::vector<std::string>& bare_flags, size_t max_positionals) {
  ConfigArgs out;
  auto has = [](const std::vector<std::string>& v, const std::string& s) {
    return std::find(v.begin(), v.end(), s) != v.end();
  };
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--set") {
      RT_REQUIRE(i + 1 < args.size(), "ranktune " + command + ": --set needs section.key=value");
      out.overrides.push_back(args[++i]);
    } else if (a.rfind("--set=", 0) == 0) {
      out.overrides.push_back(a.substr(6));
    } else if (has(flags_with_value, a)) {
      RT_REQUIRE(i + 1 < args.size(), "ranktune " + command + ": " + a + " needs a value");
      out.flags.push_back(a);
      out.flags.push_back(args[++i]);
    } else if (has(bare_flags, a)) {
      out.flags.push_back(a);
      out.flags.push_back("");
    } else if (a.rfind("--", 0) == 0) {
      throw UserError("ranktune " + command + ": unknown option " + a + " (see ranktune " + command + " --help)");
    } else if (out.config_path.empty()) {
      out.config_path = a;
    } else if (1 + out.more_positionals.size() < max_positionals) {
      out.more_positionals.push_back(a);
    } else {
      throw UserError("ranktune " + command + ": unexpected argument '" + a + "'");
    }
  }
  return out;
}

}  // namespace ranktune
