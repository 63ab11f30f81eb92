// `import ppokernels._C_cuda` must find a Python module; the CUDA kernels register themselves
// through the static STABLE_TORCH_LIBRARY_IMPL(ppokernels, CUDA, ...) initialisers of
// csrc/cuda/<stem>.cu when the shared object is loaded. The schemas they implement are defined by
// ppokernels._C (csrc/ops.cpp), which ppokernels/_backend.py loads first. The module's one
// function says which CUDA major version the kernels were compiled against (a binary for CUDA 13
// needs a torch whose CUDA runtime is 13.x).
#include <Python.h>

#ifndef PPK_CUDA_MAJOR
#error "setup.py defines PPK_CUDA_MAJOR, the CUDA major version of the torch built against"
#endif

namespace {
PyObject* py_cuda_major(PyObject*, PyObject*) { return PyLong_FromLong(PPK_CUDA_MAJOR); }
PyMethodDef methods[] = {
    {"cuda_major", py_cuda_major, METH_NOARGS,
     "CUDA major version the CUDA kernels were compiled against."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
