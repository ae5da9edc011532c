// Host emulation of the few CUDA features the MLP kernels use, so that the kernels in
// csrc/include/pyebm/cuda/mlp_energy.cuh and descent.cuh run as plain C++ with one OS thread per GPU thread.
//
// What this checks: the kernels' indexing, padding, buffer reuse and barrier placement (shared memory is
// poisoned with NaN bits, so an element read before any thread wrote it shows in the result; a barrier
// missing between a write and a read of another thread shows as a wrong or racy answer).
// What it does not check: the hardware. mma.sync is emulated from the PTX ISA's fragment layout as
// written here, and timing, bank conflicts and the memory model of the GPU are not modelled.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace pyebm_emu {

struct Dim {
  unsigned x = 0, y = 1, z = 1;
};

inline thread_local Dim tid_;
inline thread_local Dim bid_;
inline Dim bdim_, gdim_;
inline unsigned char* smem_ = nullptr;

struct Warp {
  std::barrier<> bar{32};
  uint32_t regs[32][6];
  double vals[32];
};

struct Block {
  std::barrier<> bar;
  std::atomic<int> vote{0};
  std::vector<std::unique_ptr<Warp>> warps;
  explicit Block(unsigned threads) : bar(static_cast<std::ptrdiff_t>(threads)) {
    for (unsigned w = 0; w < threads / 32; ++w) warps.emplace_back(new Warp());
  }
};
inline Block* block_ = nullptr;

inline unsigned char* dynamic_smem() { return smem_; }
inline void syncthreads() { block_->bar.arrive_and_wait(); }
inline Warp& warp() { return *block_->warps[tid_.x / 32]; }

// __syncthreads_or: a barrier that returns nonzero on every thread when pred is nonzero on any thread.
inline int syncthreads_or(int pred) {
  Block& b = *block_;
  b.bar.arrive_and_wait();  // the previous vote has been read and cleared
  if (pred) b.vote.fetch_or(1);
  b.bar.arrive_and_wait();
  const int r = b.vote.load();
  b.bar.arrive_and_wait();  // every thread has read the vote
  if (tid_.x == 0) b.vote.store(0);
  return r;
}

template <typename V>
V shfl_xor(V v, int mask) {
  Warp& w = warp();
  const unsigned lane = tid_.x & 31;
  w.vals[lane] = static_cast<double>(v);  // exact for float and double
  w.bar.arrive_and_wait();
  const V r = static_cast<V>(w.vals[lane ^ static_cast<unsigned>(mask)]);
  w.bar.arrive_and_wait();
  return r;
}

// d += A (16x16, row) * B (16x8, col) with the fragments spread over the warp's 32 lanes as in the
// PTX ISA for mma.m16n8k16 with 16-bit A/B (g = lane / 4, t = lane % 4; low half = lower index):
//   a0: A[g][2t..2t+1]  a1: A[g+8][2t..]  a2: A[g][2t+8..]  a3: A[g+8][2t+8..]
//   b0: B[2t..2t+1][g]  b1: B[2t+8..2t+9][g]
//   d0, d1: D[g][2t..2t+1]  d2, d3: D[g+8][2t..2t+1]
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, float (*val)(uint16_t)) {
  Warp& w = warp();
  const unsigned lane = tid_.x & 31;
  for (int i = 0; i < 4; ++i) w.regs[lane][i] = a[i];
  w.regs[lane][4] = b0;
  w.regs[lane][5] = b1;
  w.bar.arrive_and_wait();
  float A[16][16], B[16][8];
  auto lo = [&](uint32_t x) { return val(static_cast<uint16_t>(x & 0xffffu)); };
  auto hi = [&](uint32_t x) { return val(static_cast<uint16_t>(x >> 16)); };
  for (int L = 0; L < 32; ++L) {
    const int g = L >> 2, t = L & 3;
    const uint32_t* r = w.regs[L];
    A[g][2 * t] = lo(r[0]);
    A[g][2 * t + 1] = hi(r[0]);
    A[g + 8][2 * t] = lo(r[1]);
    A[g + 8][2 * t + 1] = hi(r[1]);
    A[g][2 * t + 8] = lo(r[2]);
    A[g][2 * t + 9] = hi(r[2]);
    A[g + 8][2 * t + 8] = lo(r[3]);
    A[g + 8][2 * t + 9] = hi(r[3]);
    B[2 * t][g] = lo(r[4]);
    B[2 * t + 1][g] = hi(r[4]);
    B[2 * t + 8][g] = lo(r[5]);
    B[2 * t + 9][g] = hi(r[5]);
  }
  w.bar.arrive_and_wait();  // every lane has read the registers before any lane deposits new ones
  const int g = static_cast<int>(lane >> 2), t = static_cast<int>(lane & 3);
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    double s = 0;
    for (int k = 0; k < 16; ++k) s += static_cast<double>(A[row][k]) * B[k][col];
    d[i] += static_cast<float>(s);
  }
}

// Runs body() as a grid of `grid` blocks of `threads` threads, one block at a time, with `smem` bytes
// of dynamic shared memory filled with 0xff bytes (NaN as fp32 and as bf16/fp16) before each block.
template <typename F>
void launch(unsigned grid, unsigned threads, size_t smem, F&& body) {
  bdim_ = Dim{threads, 1, 1};
  gdim_ = Dim{grid, 1, 1};
  std::vector<unsigned char> buf(smem + 16);
  for (unsigned b = 0; b < grid; ++b) {
    std::memset(buf.data(), 0xff, buf.size());
    smem_ = buf.data();
    Block blk(threads);
    block_ = &blk;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned i = 0; i < threads; ++i)
      pool.emplace_back([&, i, b] {
        tid_ = Dim{i, 1, 1};
        bid_ = Dim{b, 1, 1};
        body();
      });
    for (auto& th : pool) th.join();
    block_ = nullptr;
  }
}

}  // namespace pyebm_emu

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#define threadIdx (::pyebm_emu::tid_)
#define blockIdx (::pyebm_emu::bid_)
#define blockDim (::pyebm_emu::bdim_)
#define gridDim (::pyebm_emu::gdim_)
#define __syncthreads() ::pyebm_emu::syncthreads()
#define __syncthreads_or(pred) ::pyebm_emu::syncthreads_or(pred)
#define __shfl_xor_sync(mask, v, lanemask) ::pyebm_emu::shfl_xor(v, lanemask)
using std::max;
using std::min;
