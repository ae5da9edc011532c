// The data caches of the CPU the kernels run on, read once at run time: the row-block sizes of the CPU
// kernels come from them (block_bytes() in mlp_energy.cpp) instead of constants tuned on one machine.
//
// Sources, in order: Linux sysfs (/sys/devices/system/cpu/cpu0/cache/index*: level, type, size and the CPUs
// sharing each cache), then glibc's sysconf (which reads CPUID), then defaults that hold for every x86-64 server
// core of the last decade (32 KiB L1d, 1 MiB L2, 1 MiB of L3 per core). `source` says which one answered.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace pyebm {
namespace cpu {

struct CpuCaches {
  int64_t l1d = 0;          // bytes, one core's L1 data cache
  int64_t l2 = 0;           // bytes, one L2 instance
  int64_t l2_sharing = 1;   // logical CPUs that share one L2 instance
  int64_t l3 = 0;           // bytes, one L3 instance (0: none)
  int64_t l3_sharing = 1;   // logical CPUs that share one L3 instance
  const char* source = "default";
  // This core's share of the L2: what a thread's working set may use when every CPU sharing it is busy.
  int64_t l2_per_cpu() const { return l2 / (l2_sharing > 0 ? l2_sharing : 1); }
};

namespace cache_detail {

// "1024K", "32768K", "2M", "512" -> bytes; 0 when unreadable.
inline int64_t parse_size(const char* s) {
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  if (end == s || v <= 0) return 0;
  while (*end == ' ') ++end;
  switch (*end) {
    case 'K': case 'k': return v * 1024;
    case 'M': case 'm': return v * 1024 * 1024;
    case 'G': case 'g': return v * 1024 * 1024 * 1024;
    default: return v;
  }
}

// "0-1", "0,2,4-7" -> number of CPUs listed; 0 when unreadable.
inline int64_t count_cpu_list(const char* s) {
  int64_t n = 0;
  const char* p = s;
  while (*p) {
    char* end = nullptr;
    const long a = std::strtol(p, &end, 10);
    if (end == p) break;
    long b = a;
    p = end;
    if (*p == '-') {
      b = std::strtol(p + 1, &end, 10);
      if (end == p + 1) return 0;
      p = end;
    }
    if (b < a) return 0;
    n += b - a + 1;
    if (*p == ',') ++p;
    else break;
  }
  return n;
}

inline bool read_line(const std::string& path, char* buf, size_t n) {
  FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return false;
  const bool ok = std::fgets(buf, static_cast<int>(n), f) != nullptr;
  std::fclose(f);
  if (ok) buf[std::strcspn(buf, "\n")] = '\0';
  return ok;
}

inline bool from_sysfs(CpuCaches& c) {
  bool any = false;
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    char level[32], type[32], size[64], shared[256];
    if (!read_line(dir + "level", level, sizeof level)) break;
    if (!read_line(dir + "type", type, sizeof type) || !read_line(dir + "size", size, sizeof size)) continue;
    if (std::strcmp(type, "Instruction") == 0) continue;
    const int64_t bytes = parse_size(size);
    if (bytes <= 0) continue;
    int64_t sharing = 1;
    if (read_line(dir + "shared_cpu_list", shared, sizeof shared)) {
      const int64_t n = count_cpu_list(shared);
      if (n > 0) sharing = n;
    }
    switch (std::atoi(level)) {
      case 1: c.l1d = bytes; any = true; break;
      case 2: c.l2 = bytes; c.l2_sharing = sharing; any = true; break;
      case 3: c.l3 = bytes; c.l3_sharing = sharing; any = true; break;
      default: break;
    }
  }
  return any && c.l2 > 0;
}

inline bool from_sysconf(CpuCaches& c) {
  bool any = false;
#if defined(_SC_LEVEL2_CACHE_SIZE)
  const long l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE), l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (l1 > 0) c.l1d = l1;
  if (l2 > 0) { c.l2 = l2; any = true; }
  if (l3 > 0) c.l3 = l3;
  // sysconf does not say how many CPUs share a cache: L2 is per core on the x86-64 parts this targets, and
  // L3 is shared by all online CPUs (a lower bound on each CPU's share).
  const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  if (c.l3 > 0 && cpus > 0) c.l3_sharing = cpus;
#endif
  return any;
}

inline CpuCaches detect() {
  CpuCaches c;
  if (from_sysfs(c)) {
    c.source = "sysfs";
  } else {
    c = CpuCaches();
    if (from_sysconf(c)) c.source = "sysconf";
  }
  if (c.l1d <= 0) c.l1d = 32 * 1024;
  if (c.l2 <= 0) {
    c.l2 = 1024 * 1024;
    c.l2_sharing = 1;
  }
  if (c.l3 < 0) c.l3 = 0;
  return c;
}

}  // namespace cache_detail

// Read once per process (the first CPU kernel call, or pyebm._C.cpu_tuning()).
inline const CpuCaches& cpu_caches() {
  static const CpuCaches c = cache_detail::detect();
  return c;
}

}  // namespace cpu
}  // namespace pyebm
