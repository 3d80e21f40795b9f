// The native declaration of the algorithms: the one table in C++ that knows each algorithm's
// state streams (their op-argument names and order), its float hyper-parameters and its op
// flags. It mirrors the declarations of alr/algorithms.py (tests/test_declarations.py
// compares the op schemas registration.cpp generates from it with the ones alr.op_args
// generates from those).
//
// Everything else in C++ refers to a stream by its index in this table: the op layer
// (op_inputs.h) checks and passes the lists in this order, the CPU op layer binds them to
// its kernels' arguments, and the CUDA pointer rows are the parameter, the gradient, these
// streams in this order, then the master copy or rounding key and the step counter. No torch
// types, so the CUDA kernels include it too.
#pragma once

#if defined(__CUDACC__)
#define ALR_TABLE_HOST_DEVICE __host__ __device__
#else
#define ALR_TABLE_HOST_DEVICE
#endif

namespace alr {

enum class Algorithm : int { kAdam = 0, kSgd = 1 };
constexpr int kNumAlgorithms = 2;
constexpr int kMaxStreams = 3;
constexpr int kMaxHyper = 4;
constexpr int kMaxFlags = 2;

// The state streams of each algorithm, in declaration order (the index into the table).
namespace adam_stream {
enum : int { kExpAvg = 0, kExpAvgSq, kMaxExpAvgSq };
}
namespace sgd_stream {
enum : int { kMomentumBuffer = 0, kPrevDirection };
}

struct AlgorithmDecl {
  const char* name;                  // the op prefix: <name>_update_, <name>_hypergrad_stats
  int num_streams;
  const char* streams[kMaxStreams];  // the state-dict keys, which are the ops' list arguments
  int num_hyper;
  const char* hyper[kMaxHyper];      // the `float[] hyper` of the ops, in order
  const char* flags[kMaxFlags];      // the ops' bool keyword arguments, in order
};

inline constexpr AlgorithmDecl kAlgorithms[kNumAlgorithms] = {
    {"adam", 3, {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
     4, {"beta1", "beta2", "eps", "weight_decay"},
     {"decoupled_weight_decay", "maximize"}},
    {"sgd", 2, {"momentum_buffer", "hypergrad_prev_direction", nullptr},
     3, {"momentum", "dampening", "weight_decay", nullptr},
     {"nesterov", "maximize"}},
};  // clang-format: keep the table's rows as written

constexpr const AlgorithmDecl& declaration(Algorithm a) { return kAlgorithms[static_cast<int>(a)]; }
constexpr int num_streams(Algorithm a) { return declaration(a).num_streams; }

// The CUDA pointer rows of one tensor: the parameter, the gradient, the algorithm's streams,
// the master copy or rounding key (they exclude each other) and the step counter.
constexpr int kParamRow = 0;
constexpr int kGradRow = 1;
ALR_TABLE_HOST_DEVICE constexpr int stream_row(int stream) { return 2 + stream; }
constexpr int master_or_key_row(Algorithm a) { return 2 + num_streams(a); }
constexpr int step_row(Algorithm a) { return 3 + num_streams(a); }
constexpr int num_rows(Algorithm a) { return 4 + num_streams(a); }

}  // namespace alr
