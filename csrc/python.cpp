// The Python entry point: gradbridge_ext._C.bridge.

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include "bridge.h"

namespace {

// torch._C._has_torch_function_unary's C entry and its self. torch's check is
// not exported to extensions; calling its entry gives torch's exact answer on
// every torch version, including the "skip one hop" flag it consumes.
PyCFunction has_torch_function_unary = nullptr;
PyObject* has_torch_function_unary_self = nullptr;
// torch.overrides.handle_torch_function, for the calls that defer.
PyObject* handle_torch_function = nullptr;

bool has_torch_function(PyObject* obj) {
  auto answer =
      THPObjectPtr(has_torch_function_unary(has_torch_function_unary_self, obj));
  if (!answer) {
    throw python_error();
  }
  return answer.get() == Py_True;
}

// NB: bridge sits on a model's forward path, once per step or per layer, so its
// entry is a bare METH_O function: no argument parser and no pybind11 casters,
// which would cost more than the alias itself.
PyObject* bridge(PyObject* module, PyObject* t) {
  HANDLE_TH_ERRORS
  // TorchFunctionModes, Tensor subclasses and fx Proxies see bridge as they see
  // a torch function; torch.overrides picks which of them answer.
  if (has_torch_function(t)) {
    auto api = THPObjectPtr(PyObject_GetAttrString(module, "bridge"));
    auto relevant = THPObjectPtr(PyTuple_Pack(1, t));
    if (!api || !relevant) {
      return nullptr;
    }
    return PyObject_CallFunctionObjArgs(
        handle_torch_function, api.get(), relevant.get(), t, nullptr);
  }
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
  // Both are kept for the life of the process, as torch keeps them.
  pybind11::object check =
      pybind11::module_::import("torch._C").attr("_has_torch_function_unary");
  TORCH_CHECK(
      PyCFunction_Check(check.ptr()) &&
          PyCFunction_GET_FLAGS(check.ptr()) == METH_O,
      "gradbridge_ext: torch._C._has_torch_function_unary is not the METH_O "
      "C function this build expects");
  has_torch_function_unary = PyCFunction_GET_FUNCTION(check.ptr());
  has_torch_function_unary_self = PyCFunction_GET_SELF(check.ptr());
  check.release();
  pybind11::object handle =
      pybind11::module_::import("torch.overrides").attr("handle_torch_function");
  handle_torch_function = handle.release().ptr();
  if (PyModule_AddFunctions(m.ptr(), methods) < 0) {
    throw pybind11::error_already_set();
  }
}
