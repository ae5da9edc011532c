// The per-row descent update lives in pyebm/descent_update.h (host and device); the CPU ops use it
// under their own namespace.
#pragma once

#include "pyebm/descent_update.h"

namespace pyebm {
namespace cpu {
using pyebm::NoiseMode;
using pyebm::RowState;
using pyebm::UpdateRule;
using pyebm::bound_row_at_end;
using pyebm::kConverged;
using pyebm::kMaxSteps;
using pyebm::kNonFinite;
using pyebm::update_row;
}  // namespace cpu
}  // namespace pyebm
