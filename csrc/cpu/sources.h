// pyebm._C.Snapshot: the tensors a packed state was built from, read from a module by their names, and a check,
// on every call, that the module still holds exactly those tensors.
//
// A source is a dotted name under a root module ("layers.0.weight"). It is resolved the way nn.Module resolves
// attributes, from the root every time: each submodule through _modules, the last part through _parameters, then
// _buffers, then plain attribute access (which computes a parametrized weight, or returns the plain attribute of
// the weight_norm / spectral_norm hooks). A replaced submodule is therefore seen as well as a replaced tensor.
// A snapshot keeps, per source:
//   - the tensor object itself (a strong reference: its identity cannot be reused while we compare with it),
//   - a detached alias of it (a tensor of its own that shares the storage): whatever a pack points into stays
//     alive however the module's tensor is changed later (.data =, a moved module), so a call running on a pack
//     never reads freed memory,
//   - its data pointer, version counter, storage offset, sizes, strides, dtype and device when read.
// unchanged() resolves every source again and compares: another object (assignment, functional_call, a
// parametrization computing a new tensor, a new submodule), another storage or offset (.data =, .to()), another
// version (every in-place write through the tensor or its views: optimizer steps, load_state_dict, copy_()),
// another shape or layout. Writes that bypass the version counter (through `param.data`, numpy views) are not
// seen: autograd does not see them either. Inference tensors have no version counter: a snapshot holding one is
// never unchanged, so every call packs again.
//
// Every method runs with the GIL held (pybind11 calls), so reading a module's attributes never races a Python
// thread that assigns them; what a pack reads afterwards, with the GIL released, is owned by the snapshot.
#pragma once

#include <torch/python.h>

#include <pybind11/pybind11.h>

#include <c10/util/SmallVector.h>

#include <string>
#include <utility>
#include <vector>

namespace pyebm {
namespace cpu {

namespace py = pybind11;

class Snapshot {
 public:
  // names: a sequence of dotted names under root; None gives an absent source (an undefined tensor, e.g. a bias
  // the model does not have).
  // The root is held by a weak reference: a snapshot lives in its module's packed state, and a strong one would
  // make a reference cycle that the garbage collector cannot see through.
  Snapshot(const py::object& root, const py::sequence& names) : root_(py::weakref(root)) {
    slots_.reserve(names.size());
    for (const auto& item : names) {
      Slot s;
      if (!item.is_none()) {
        const std::string name = py::cast<std::string>(item);
        // Every dotted prefix ("layers", "layers.0") is one node, shared by the sources under it, so a check
        // resolves each submodule once however many sources it holds.
        int parent = -1;
        size_t begin = 0;
        while (true) {
          const size_t dot = name.find('.', begin);
          if (dot == std::string::npos) {
            s.key = intern(name.substr(begin));
            break;
          }
          parent = node(parent, name.substr(0, dot), name.substr(begin, dot - begin));
          begin = dot + 1;
        }
        s.parent = parent;
        s.name = name;
      }
      slots_.push_back(std::move(s));
    }
    read_all();
  }

  // A new snapshot of the same sources, read now.
  Snapshot again() const {
    Snapshot s(*this);
    s.read_all();
    return s;
  }

  // versions=false compares everything but the version counters: the same objects and storages, whatever was
  // written into them (what a captured CUDA graph, which reads every tensor at its address, needs).
  bool unchanged(bool versions = true) const {
    if (volatile_ && versions) return false;
    const py::object root = this->root();
    c10::SmallVector<py::object, 8> at(nodes_.size());  // nodes are in creation order: parents first
    for (size_t i = 0; i < nodes_.size(); ++i)
      at[i] = submodule(nodes_[i].parent < 0 ? root : at[nodes_[i].parent], nodes_[i].key.ptr());
    // Three passes over the sources, so that the cache misses of a check that runs cold (right after a kernel
    // streamed its weights through the caches) overlap instead of waiting for each other: the objects by
    // identity (prefetching each tensor's metadata), then each tensor's storage (prefetched), then the
    // comparisons.
    for (const Slot& s : slots_) {
      if (!s.key) continue;
      const py::object now = leaf(s.parent < 0 ? root : at[s.parent], s.key.ptr());
      if (now.ptr() != s.seen.ptr()) return false;
      if (!now.is_none()) prefetch(THPVariable_Unpack(now.ptr()).unsafeGetTensorImpl());
    }
    for (const Slot& s : slots_)
      if (s.key && !s.seen.is_none()) prefetch(THPVariable_Unpack(s.seen.ptr()).storage().unsafeGetStorageImpl());
    for (const Slot& s : slots_)
      if (s.key && !s.seen.is_none() && !same_tensor(s, versions)) return false;
    return true;
  }

  // The aliases in source order (undefined for absent sources and for sources holding None).
  const std::vector<at::Tensor>& tensors() const { return aliases_; }
  size_t size() const { return slots_.size(); }

 private:
  struct Slot {
    int parent = -1;  // the node of the module holding the source (-1: the root)
    py::object key;   // interned last name part; empty for an absent source
    std::string name;
    py::object seen;  // what the source held when read
    const void* ptr = nullptr;
    int64_t version = 0, offset = 0;
    c10::SmallVector<int64_t, 4> sizes, strides;  // inline up to 4 dims: a check reads no other memory
    at::ScalarType dtype = at::kFloat;
    at::Device device = at::kCPU;
  };
  struct Node {
    int parent;      // -1: a child of the root
    std::string path;
    py::object key;  // interned name part
  };

  static py::object intern(const std::string& s) {
    return py::reinterpret_steal<py::object>(PyUnicode_InternFromString(s.c_str()));
  }
  // The node for the submodule at `path` (whose last part is `part`) under node `parent`, created once.
  int node(int parent, const std::string& path, const std::string& part) {
    for (size_t i = 0; i < nodes_.size(); ++i)
      if (nodes_[i].path == path) return static_cast<int>(i);
    nodes_.push_back(Node{parent, path, intern(part)});
    return static_cast<int>(nodes_.size()) - 1;
  }

  // Interned names of nn.Module's attribute dicts (created once, kept for the process's lifetime).
  static PyObject* interned(const char* s) { return PyUnicode_InternFromString(s); }
  static PyObject* modules_key() {
    static PyObject* k = interned("_modules");
    return k;
  }
  static PyObject* parameters_key() {
    static PyObject* k = interned("_parameters");
    return k;
  }
  static PyObject* buffers_key() {
    static PyObject* k = interned("_buffers");
    return k;
  }

  // obj.__dict__[dict_name][key] (borrowed; nullptr when absent).
  static PyObject* member(PyObject* obj, PyObject* dict_name, PyObject* key) {
    PyObject** dictptr = _PyObject_GetDictPtr(obj);
    if (dictptr == nullptr || *dictptr == nullptr) return nullptr;
    PyObject* d = PyDict_GetItemWithError(*dictptr, dict_name);
    if (d == nullptr && PyErr_Occurred()) throw py::error_already_set();
    if (d == nullptr || !PyDict_Check(d)) return nullptr;
    PyObject* v = PyDict_GetItemWithError(d, key);
    if (v == nullptr && PyErr_Occurred()) throw py::error_already_set();
    return v;
  }
  static py::object getattr(PyObject* obj, PyObject* key) {
    PyObject* v = PyObject_GetAttr(obj, key);
    if (v == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(v);
  }

  py::object root() const {
    PyObject* obj = PyWeakref_GetObject(root_.ptr());  // borrowed; Py_None once the module is gone
    if (obj == nullptr) throw py::error_already_set();
    if (obj == Py_None) throw py::value_error("pyebm: the module of this snapshot no longer exists");
    return py::reinterpret_borrow<py::object>(obj);
  }
  // obj's submodule `key`: through _modules, else attribute access.
  static py::object submodule(const py::object& obj, PyObject* key) {
    PyObject* sub = member(obj.ptr(), modules_key(), key);
    return sub != nullptr ? py::reinterpret_borrow<py::object>(sub) : getattr(obj.ptr(), key);
  }
  // obj's tensor `key`: _parameters, then _buffers, then attribute access.
  static py::object leaf(const py::object& obj, PyObject* key) {
    for (PyObject* d : {parameters_key(), buffers_key()}) {
      PyObject* v = member(obj.ptr(), d, key);
      if (v != nullptr) return py::reinterpret_borrow<py::object>(v);
    }
    return getattr(obj.ptr(), key);
  }
  // The source's current value, resolved from the root.
  py::object resolve(const Slot& s) const {
    if (s.parent < 0) return leaf(root(), s.key.ptr());
    // the chain of nodes from the root down to the source's module
    c10::SmallVector<int, 8> chain;
    for (int n = s.parent; n >= 0; n = nodes_[n].parent) chain.push_back(n);
    py::object obj = root();
    for (auto it = chain.rbegin(); it != chain.rend(); ++it) obj = submodule(obj, nodes_[*it].key.ptr());
    return leaf(obj, s.key.ptr());
  }

  static void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(p);
    __builtin_prefetch(static_cast<const char*>(p) + 64);
#else
    (void)p;
#endif
  }

  static bool same_tensor(const Slot& s, bool versions) {
    const at::Tensor& t = THPVariable_Unpack(s.seen.ptr());
    return t.const_data_ptr() == s.ptr && (!versions || t._version() == s.version) &&
           t.storage_offset() == s.offset && t.sizes().equals(s.sizes) && t.strides().equals(s.strides) &&
           t.scalar_type() == s.dtype && t.device() == s.device;
  }

  void read_all() {
    aliases_.clear();
    aliases_.reserve(slots_.size());
    volatile_ = false;
    for (Slot& s : slots_) {
      if (!s.key) {
        aliases_.emplace_back();
        continue;
      }
      s.seen = resolve(s);
      PyObject* v = s.seen.ptr();
      if (v == Py_None) {
        aliases_.emplace_back();
        continue;
      }
      if (!THPVariable_Check(v)) throw py::type_error("pyebm: " + s.name + " is not a tensor");
      const at::Tensor& t = THPVariable_Unpack(v);
      TORCH_CHECK(t.layout() == at::kStrided && t.has_storage(), "pyebm: ", s.name,
                  " must be a dense (strided) tensor; got layout ", t.layout());
      s.ptr = t.const_data_ptr();
      if (t.is_inference()) {
        volatile_ = true;  // no version counter: never unchanged
        s.version = 0;
      } else {
        s.version = t._version();
      }
      s.offset = t.storage_offset();
      s.sizes.assign(t.sizes().begin(), t.sizes().end());
      s.strides.assign(t.strides().begin(), t.strides().end());
      s.dtype = t.scalar_type();
      s.device = t.device();
      aliases_.push_back(t.detach());
    }
  }

  py::weakref root_;
  std::vector<Node> nodes_;
  std::vector<Slot> slots_;
  std::vector<at::Tensor> aliases_;
  bool volatile_ = false;  // holds an inference tensor: never unchanged
};

}  // namespace cpu
}  // namespace pyebm
