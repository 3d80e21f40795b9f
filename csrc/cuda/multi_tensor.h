// How the CUDA kernels split a call's tensors into blocks and launches (apex-style
// multi-tensor apply). Plain C++ with no torch or CUDA dependency: the native tests
// (csrc/tests) run the packing on the host.
//
// Every tensor is cut into chunks of kChunkSize elements (the last one may be shorter; an
// empty tensor has none) and one thread block handles one chunk. A launch receives its
// metadata by value, in one kernel argument (a TensorTable) that stays under the 4 KiB
// kernel-parameter limit: up to kMaxTensors tensors (their data pointers, element counts,
// positions in the op's lists and first statistics row) and up to kMaxBlocks blocks (the
// tensor slot and chunk of each). pack_launches fills tables in tensor order and launches
// one whenever its blocks are used up, or its tensor slots are and the last slot's tensor
// has no chunk left; a tensor whose chunks span two launches takes slot 0 of the next
// table. The launch count therefore grows with the number of chunks (and with tensors
// only kMaxTensors at a time), and nothing is copied from the host to the device.
//
// Statistics rows. Chunk c of the i-th tensor writes its partial statistics to row
// first_row(i) + c of a [total chunks, width] buffer, where first_row(i) is the number of
// chunks of tensors 0..i-1. The rows of one tensor are then summed in chunk order, which
// makes the result independent of how the chunks were packed into launches.
//
// Offsets are 64-bit: a tensor may exceed 2^31 elements (a chunk index is 32-bit, which
// allows 2^31 chunks per tensor).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>

namespace alr {
namespace cuda {

// Elements per block: 64 KiB of fp32 per stream, 32 elements per thread. Large enough to
// amortise a block's set-up (its per-tensor scalars are computed in double), small enough
// that a tensor of a few million elements spreads over every SM of an H100.
constexpr int64_t kChunkSize = 16384;
constexpr int kBlockThreads = 512;

// Budget for one kernel's arguments (the classic CUDA limit, portable to every driver).
constexpr size_t kMaxKernelArgBytes = 4096;
// Bytes of a kernel's arguments outside its TensorTable (hyper-parameters, pointers to the
// device scalars and to the statistics); each kernel static_asserts its total.
constexpr size_t kReservedArgBytes = 320;
constexpr int kMaxBlocksPerLaunch = 320;

// ceil(numel / chunk) without overflow.
inline int64_t num_chunks(int64_t numel, int64_t chunk) {
  return numel / chunk + (numel % chunk != 0 ? 1 : 0);
}

// The metadata of one launch. ptrs[r][slot] is the pointer of row r (a data stream such as
// the parameter, the gradient or a master copy, or a scalar such as the step counter or the
// rounding key) of the tensor in `slot`; rows a call does not use hold nullptr. The step
// kernels' tables (7 rows for Adam, 6 for SGD: launch.h) hold 28 and 32 tensors.
template <int kRows, int kMaxTensors_, int kMaxBlocks_>
struct TensorTable {
  static constexpr int kMaxTensors = kMaxTensors_;
  static constexpr int kMaxBlocks = kMaxBlocks_;
  static_assert(kMaxTensors > 0 && kMaxTensors <= 256, "a block's slot is stored in a uint8_t");

  void* ptrs[kRows][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t first_row[kMaxTensors];    // statistics row of the tensor's chunk 0
  int32_t index[kMaxTensors];        // position of the tensor in the op's lists
  int32_t block_chunk[kMaxBlocks];   // chunk of the tensor, counted from the tensor's start
  uint8_t block_slot[kMaxBlocks];    // tensor slot of each block
};

// The largest table of kRows pointer rows with kMaxBlocksPerLaunch blocks that fits the
// budget next to kReservedArgBytes of other arguments.
template <int kRows>
struct TableFor {
  static constexpr size_t kPerTensor = kRows * sizeof(void*) + 2 * sizeof(int64_t) + sizeof(int32_t);
  static constexpr size_t kPerBlock = sizeof(int32_t) + sizeof(uint8_t);
  static constexpr int kTensors = static_cast<int>(
      (kMaxKernelArgBytes - kReservedArgBytes - kMaxBlocksPerLaunch * kPerBlock) / kPerTensor);
  using type = TensorTable<kRows, (kTensors < 256 ? kTensors : 255), kMaxBlocksPerLaunch>;
  static_assert(sizeof(type) <= kMaxKernelArgBytes - kReservedArgBytes, "table over budget");
};

// Fills `table` for the tensors of the given element counts and calls launch(num_blocks)
// for every table, in order. set_slot(slot, i) must write the pointer rows of tensor i into
// `slot`; the element count, position and first statistics row are written here. Returns
// the total number of chunks (the statistics rows). Empty tensors get no slot and no block.
template <typename Table, typename SetSlot, typename Launch>
int64_t pack_launches(const int64_t* numels, int64_t num_tensors, int64_t chunk, Table& table,
                      SetSlot&& set_slot, Launch&& launch) {
  if (chunk <= 0 || num_tensors < 0) {
    throw std::invalid_argument("pack_launches: chunk must be positive and num_tensors non-negative");
  }
  int used = 0;    // tensor slots of the current table
  int blocks = 0;  // blocks of the current table
  int64_t row = 0;
  auto occupy = [&](int64_t i) {
    const int slot = used++;
    set_slot(slot, i);
    table.numel[slot] = numels[i];
    table.first_row[slot] = row;
    table.index[slot] = static_cast<int32_t>(i);
    return slot;
  };
  for (int64_t i = 0; i < num_tensors; ++i) {
    if (numels[i] < 0) {
      throw std::invalid_argument("pack_launches: negative numel");
    }
    const int64_t chunks = num_chunks(numels[i], chunk);
    if (chunks > std::numeric_limits<int32_t>::max()) {
      throw std::invalid_argument("pack_launches: more than 2^31 - 1 chunks in one tensor");
    }
    if (chunks == 0) {
      continue;
    }
    int slot = occupy(i);
    for (int64_t c = 0; c < chunks; ++c) {
      table.block_slot[blocks] = static_cast<uint8_t>(slot);
      table.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c + 1 == chunks;
      if (blocks == Table::kMaxBlocks || (used == Table::kMaxTensors && last_chunk)) {
        launch(blocks);
        blocks = 0;
        used = 0;
        if (!last_chunk) {
          slot = occupy(i);  // the rest of tensor i continues in the next table
        }
      }
    }
    row += chunks;
  }
  if (blocks > 0) {
    launch(blocks);
  }
  return row;
}

// Per-tensor ranges of statistics rows for the finishing sum: tensor first + b (b < count)
// owns rows [row_begin[b], row_begin[b + 1]).
template <int kMaxTensors_>
struct RowTable {
  static constexpr int kMaxTensors = kMaxTensors_;
  int64_t row_begin[kMaxTensors + 1];
  int64_t first;
};
using SumTable = RowTable<static_cast<int>((kMaxKernelArgBytes - kReservedArgBytes) / sizeof(int64_t)) - 2>;

// Fills `table` for every tensor (empty ones included: they own no rows) and calls
// launch(count) for consecutive groups of at most kMaxTensors tensors.
template <typename Table, typename Launch>
void pack_row_ranges(const int64_t* numels, int64_t num_tensors, int64_t chunk, Table& table, Launch&& launch) {
  int64_t row = 0;
  for (int64_t first = 0; first < num_tensors; first += Table::kMaxTensors) {
    const int64_t count = num_tensors - first < Table::kMaxTensors ? num_tensors - first : Table::kMaxTensors;
    table.first = first;
    for (int64_t b = 0; b < count; ++b) {
      table.row_begin[b] = row;
      row += num_chunks(numels[first + b], chunk);
    }
    table.row_begin[count] = row;
    launch(static_cast<int>(count));
  }
}

// Step counters to increment after an update: one thread each.
struct StepTable {
  static constexpr int kMaxTensors = 480;
  void* steps[kMaxTensors];
};

}  // namespace cuda
}  // namespace alr
