// Generation, top to bottom: generate() checks the options and runs the prompts in batches;
// generate_batch() puts the prefix its prompts have in common through the model's normal forward
// (prefill), then advances every sequence one position per decode step, in lock step: a sequence
// is fed its own prompt until that is used up, then the tokens it samples. Lock step keeps one
// cache length and one position for the whole batch, at the cost of decoding the part of a longer
// prompt beyond the shortest one token at a time; prompts of a batch are usually of similar length.
// sample_token() turns a row of logits into a token.
#include "ranktune/generate.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>

#include "ranktune/error.h"

namespace ranktune {
namespace {

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform in [0, 1) with 53 random bits.
double uniform01(uint64_t& state) { return static_cast<double>(splitmix64(state) >> 11) * 0x1.0p-53; }

// The random stream of prompt i: a function of (seed, i) only, so a prompt samples the same tokens
// whatever else is in its batch.
uint64_t stream_state(uint64_t seed, size_t prompt_index) {
  uint64_t state = seed ^ (0xD1B54A32D192ED03ull * (static_cast<uint64_t>(prompt_index) + 1));
  return splitmix64(state);
}

struct Sequence {
  std::vector<int32_t> tokens;  // the prompt, then the generated tokens
  int64_t prompt_len = 0;
  std::vector<int32_t>* generated = nullptr;
  uint64_t rng_state = 0;
  bool done = false;
};

void generate_batch(LlamaModel& model, std::vector<Sequence>& seqs, const SamplingOptions& options) {
  const int64_t max_seq = model.options().max_seq, vocab = model.arch().vocab_size;
  const int64_t batch = static_cast<int64_t>(seqs.size());
  // A sequence stops at max_new_tokens or max_seq tokens; its last token is never fed back, so the
  // cache holds one position less.
  int64_t shortest = std::numeric_limits<int64_t>::max(), cache_len = 0;
  for (const Sequence& s : seqs) {
    shortest = std::min(shortest, s.prompt_len);
    cache_len = std::max(cache_len, std::min(max_seq, s.prompt_len + options.max_new_tokens) - 1);
  }
  // The common prefix but its last token: that one is the first decode step's input, whose logits
  // give the first new token.
  const int64_t n_prefill = shortest - 1;
  std::vector<int32_t> prefix;
  for (const Sequence& s : seqs) prefix.insert(prefix.end(), s.tokens.begin(), s.tokens.begin() + n_prefill);
  model.prefill(batch, cache_len, n_prefill, prefix.data());

  std::vector<int32_t> feed(static_cast<size_t>(batch));
  for (int64_t pos = n_prefill;; ++pos) {
    bool any_running = false;
    for (int64_t b = 0; b < batch; ++b) {
      const Sequence& s = seqs[static_cast<size_t>(b)];
      feed[static_cast<size_t>(b)] = s.done ? 0 : s.tokens[static_cast<size_t>(pos)];  // a finished one idles on 0
      any_running = any_running || !s.done;
    }
    if (!any_running) break;
    const std::vector<float> logits = model.decode_step(feed);
    for (int64_t b = 0; b < batch; ++b) {
      Sequence& s = seqs[static_cast<size_t>(b)];
      if (s.done || pos + 1 < s.prompt_len) continue;  // finished, or still reading its prompt
      const int32_t next = sample_token(logits.data() + b * vocab, vocab, options.temperature, options.top_p, s.rng_state);
      if (std::find(options.stop_ids.begin(), options.stop_ids.end(), next) != options.stop_ids.end()) {
        s.done = true;
        continue;
      }
      s.tokens.push_back(next);
      s.generated->push_back(next);
      s.done = static_cast<int64_t>(s.generated->size()) >= options.max_new_tokens ||
               static_cast<int64_t>(s.tokens.size()) >= max_seq;
    }
  }
}

}  // namespace

std::vector<std::vector<int32_t>> generate(LlamaModel& model, const std::vector<std::vector<int32_t>>& prompts,
                                           const SamplingOptions& options) {
  RT_REQUIRE(std::isfinite(options.temperature) && options.temperature >= 0,
             "temperature must be 0 (greedy) or positive, got " + std::to_string(options.temperature));
  RT_REQUIRE(options.top_p > 0 && options.top_p <= 1, "top_p must be in (0, 1], got " + std::to_string(options.top_p));
  RT_REQUIRE(options.max_new_tokens >= 0, "max_new_tokens must be >= 0, got " + std::to_string(options.max_new_tokens));
  const int64_t max_seq = model.options().max_seq, vocab = model.arch().vocab_size;
  const size_t max_batch = static_cast<size_t>(model.options().max_batch);

  std::vector<std::vector<int32_t>> generated(prompts.size());
  std::vector<Sequence> batch;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::vector<int32_t>& prompt = prompts[i];
    RT_REQUIRE(!prompt.empty(), "prompt " + std::to_string(i) + " has no tokens: generation needs at least one");
    for (int32_t id : prompt)
      RT_REQUIRE(id >= 0 && id < vocab, "prompt " + std::to_string(i) + " has token id " + std::to_string(id) +
                                            ", outside the model's vocabulary of " + std::to_string(vocab));
    if (static_cast<int64_t>(prompt.size()) >= max_seq || options.max_new_tokens == 0) continue;
    batch.push_back(Sequence{prompt, static_cast<int64_t>(prompt.size()), &generated[i], stream_state(options.seed, i)});
    if (batch.size() == max_batch) {
      generate_batch(model, batch, options);
      batch.clear();
    }
  }
  if (!batch.empty()) generate_batch(model, batch, options);
  return generated;
}

int32_t sample_token(const float* logits, int64_t vocab, double temperature, double top_p, uint64_t& rng_state) {
  const int64_t argmax = std::max_element(logits, logits + vocab) - logits;  // the first of equal maxima
  if (temperature == 0) return static_cast<int32_t>(argmax);

  // Unnormalised probabilities exp((logit - max) / temperature); `total` is their sum.
  std::vector<double> weight(static_cast<size_t>(vocab));
  double total = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    weight[static_cast<size_t>(i)] = std::exp((static_cast<double>(logits[i]) - logits[argmax]) / temperature);
    total += weight[static_cast<size_t>(i)];
  }
  // The nucleus: ids by probability (ties by id) until their mass reaches top_p. It is usually a
  // few tokens, so a growing head of the order is sorted instead of the whole vocabulary.
  std::vector<int32_t> ids(static_cast<size_t>(vocab));
  std::iota(ids.begin(), ids.end(), 0);
  if (top_p < 1) {
    const auto more_probable = [&](int32_t a, int32_t b) {
      const double wa = weight[static_cast<size_t>(a)], wb = weight[static_cast<size_t>(b)];
      return wa > wb || (wa == wb && a < b);
    };
    const double target = top_p * total;
    size_t head = std::min<size_t>(ids.size(), 64), kept = 0;
    for (;;) {
      std::partial_sort(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(head), ids.end(), more_probable);
      double mass = 0;
      for (kept = 0; kept < head && mass < target; ++kept) mass += weight[static_cast<size_t>(ids[kept])];
      if (mass >= target || head == ids.size()) break;
      head = std::min(ids.size(), head * 8);
    }
    ids.resize(kept);
  }
  // A draw in [0, mass of the kept tokens), located by walking them.
  double mass = 0;
  for (int32_t id : ids) mass += weight[static_cast<size_t>(id)];
  const double u = uniform01(rng_state) * mass;
  double cumulative = 0;
  for (int32_t id : ids) {
    cumulative += weight[static_cast<size_t>(id)];
    if (u < cumulative) return id;
  }
  return ids.back();
}

}  // namespace ranktune
