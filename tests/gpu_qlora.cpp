// QLoRA on the GPU: the NF4 base (dequantized by kernels/nf4.cu right before each GEMM) against
// bf16 LoRA on the quickstart task, from a base trained from scratch on it.
#include <gtest/gtest.h>

#include <cmath>

#include "gpu_skip.h"
#include "qlora_quickstart.h"

TEST(GpuQLoRA, QuickstartTaskStaysCloseToBf16Lora) {
  SKIP_WITHOUT_GPU();
  // A base part-way trained (loss ~0.5): from a converged one both losses are ~0.005 and their
  // ratio is noise.
  const auto [lora, qlora] = lora_and_qlora_losses(fresh_temp_dir("gpu_qlora_quickstart"), "cuda:0", 300, 300);
  EXPECT_LT(lora, 1.0);
  EXPECT_LT(std::fabs(qlora - lora) / lora, 0.10);
}
