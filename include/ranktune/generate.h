// Text generation with the model's KV cache: greedy decoding or temperature + nucleus (top-p)
// sampling with a seeded, deterministic RNG. Sampling runs on the host from downloaded logits.
#pragma once
#include <cstdint>
#include <vector>

#include "ranktune/model.h"

namespace ranktune {

struct SamplingOptions {
  int64_t max_new_tokens = 32;
  double temperature = 0.0;  // 0: greedy (argmax, the lowest id on ties)
  double top_p = 1.0;        // keep the most probable tokens until their mass reaches top_p
  uint64_t seed = 0;
  std::vector<int32_t> stop_ids;  // generation of a sequence ends at one of these (not returned)
};

// The tokens generated after each prompt (the prompt not included). A sequence ends at a stop id,
// after max_new_tokens, or when prompt + generated tokens fill the model's max_seq (a prompt that
// fills it already gets nothing). Prompts run in batches of the model's max_batch; each prompt
// samples from its own random stream (seed, prompt index), so its result does not depend on the
// other prompts of its batch. Throws UserError for an empty prompt or out-of-range options.
std::vector<std::vector<int32_t>> generate(LlamaModel& model, const std::vector<std::vector<int32_t>>& prompts,
                                           const SamplingOptions& options);

// One token from a row of logits [vocab]: greedy when temperature is 0, else a draw from
// softmax(logits / temperature) restricted to the top-p nucleus (tokens sorted by probability,
// ties by id; the smallest prefix whose mass reaches top_p). rng_state is a splitmix64 state,
// advanced by one draw per sampled token.
int32_t sample_token(const float* logits, int64_t vocab, double temperature, double top_p, uint64_t& rng_state);

}  // namespace ranktune
