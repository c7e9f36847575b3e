// The Python entry point: gradbridge_ext._C.bridge.

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include "bridge.h"

namespace {

// NB: bridge sits on a model's forward path, once per step or per layer, so its
// entry is a bare METH_O function: no argument parser and no pybind11 casters,
// which would cost more than the alias itself.
PyObject* bridge(PyObject* /*module*/, PyObject* t) {
  HANDLE_TH_ERRORS
  if (!THPVariable_Check(t)) {
    return PyErr_Format(
        PyExc_TypeError,
        "bridge(): argument 't' must be a torch.Tensor, not %s",
        Py_TYPE(t)->tp_name);
  }
  return THPVariable_Wrap(gradbridge::bridge(THPVariable_Unpack(t)));
  END_HANDLE_TH_ERRORS
}

// The docstring is attached from Python (gradbridge_ext/__init__.py).
PyMethodDef methods[] = {
    {"bridge", bridge, METH_O, nullptr},
    {nullptr, nullptr, 0, nullptr}};

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  if (PyModule_AddFunctions(m.ptr(), methods) < 0) {
    throw pybind11::error_already_set();
  }
}
