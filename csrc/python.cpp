// The Python entry points: gradbridge_ext._C.bridge, _C.straight_through and _C.rotate_to.

#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>
#include <torch/csrc/utils/pybind.h>  // not torch/extension.h: the C++ frontend (nn, optim) it brings lengthens the compile (docs/install.md)

#include "bridge.h"

namespace {

// torch.overrides.redispatch_function, where torch has it, asks the next
// __torch_function__ check to answer no, and raises unless the function it
// calls consumes that request; such a call takes the Python entry, whose check does.
bool skip_next_torch_function() {
#if GRADBRIDGE_HAS_SKIP_NEXT
  return at::impl::PythonTorchFunctionTLS::peek_skip_next();
#else
  return false;
#endif
}

// True when torch's __torch_function__ check would answer no for these
// positional plain Tensors (or Parameters): nothing to defer to.
bool plain_tensors(PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    if (!THPVariable_CheckExact(args[i])) {
      return false;
    }
  }
  return !kwnames && !at::impl::torch_function_mode_enabled() && !skip_next_torch_function();
}

// The call as it was made, to the module's Python entry of that name.
PyObject* hand_off(PyObject* module, PyObject* name, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  auto python_entry = THPObjectPtr(PyObject_GetAttr(module, name));
  if (!python_entry) {
    return nullptr;
  }
  return PyObject_Vectorcall(python_entry.get(), args, nargs, kwnames);
}

// NB: bridge sits on a model's forward path, once per step or per layer, and
// the cut, bridge(t), must cost no more than `t.data`. So the entry is a bare
// vectorcall function that handles that one call and nothing else: one
// positional plain Tensor (or Parameter), no TorchFunctionMode. Exactly then
// torch's own __torch_function__ check answers no, so there is nothing to
// defer to. Every other call, options, subclasses, modes and bad arguments,
// goes to the Python entry `_bridge_with_options` (gradbridge_ext/ops.py),
// which binds and checks the arguments and calls bridge_parsed.
PyObject* bridge_entry(
    PyObject* module, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  HANDLE_TH_ERRORS
  if (nargs == 1 && plain_tensors(args, nargs, kwnames)) {
    return THPVariable_Wrap(gradbridge::bridge(THPVariable_Unpack(args[0])));
  }
  static PyObject* const name = PyUnicode_InternFromString("_bridge_with_options");
  return hand_off(module, name, args, nargs, kwnames);
  END_HANDLE_TH_ERRORS
}

// The same for straight_through(x, q): the STE of a quantizer, once per layer
// and step, with the rest handed to `_straight_through_with_options`.
PyObject* straight_through_entry(
    PyObject* module, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  HANDLE_TH_ERRORS
  if (nargs == 2 && plain_tensors(args, nargs, kwnames)) {
    return THPVariable_Wrap(gradbridge::straight_through(THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1])));
  }
  static PyObject* const name = PyUnicode_InternFromString("_straight_through_with_options");
  return hand_off(module, name, args, nargs, kwnames);
  END_HANDLE_TH_ERRORS
}

// And for rotate_to(x, q), with the rest handed to `_rotate_to_in_python`.
PyObject* rotate_to_entry(
    PyObject* module, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  HANDLE_TH_ERRORS
  if (nargs == 2 && plain_tensors(args, nargs, kwnames)) {
    return THPVariable_Wrap(gradbridge::rotate_to(THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1])));
  }
  static PyObject* const name = PyUnicode_InternFromString("_rotate_to_in_python");
  return hand_off(module, name, args, nargs, kwnames);
  END_HANDLE_TH_ERRORS
}

// gradbridge::bridge for arguments the Python entry has parsed: t a Tensor,
// grad_scale a float or a Tensor, attach None or a bool. The C++ function, not
// torch.ops: it names an unsupported layout before a subclass's
// __torch_dispatch__ could answer, and the operator checks the values.
PyObject* bridge_parsed(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  // Private, but reachable: a wrong call is refused, never a crash.
  TORCH_CHECK_TYPE(
      nargs == 3 && THPVariable_Check(args[0]) &&
          (THPVariable_Check(args[1]) || PyFloat_Check(args[1])) &&
          (args[2] == Py_None || PyBool_Check(args[2])),
      "_bridge_parsed(t, grad_scale, attach) takes what bridge() has parsed; call bridge()");
  const auto& t = THPVariable_Unpack(args[0]);
  const auto attach = args[2] == Py_None ? gradbridge::nullopt : gradbridge::optional<bool>(args[2] == Py_True);
  if (THPVariable_Check(args[1])) {
    return THPVariable_Wrap(gradbridge::bridge(t, THPVariable_Unpack(args[1]), attach));
  }
  return THPVariable_Wrap(gradbridge::bridge(t, PyFloat_AS_DOUBLE(args[1]), attach));
  END_HANDLE_TH_ERRORS
}

// gradbridge::straight_through for parsed arguments: x and q Tensors,
// grad_scale a float or a Tensor.
PyObject* straight_through_parsed(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(
      nargs == 3 && THPVariable_Check(args[0]) && THPVariable_Check(args[1]) &&
          (THPVariable_Check(args[2]) || PyFloat_Check(args[2])),
      "_straight_through_parsed(x, q, grad_scale) takes what straight_through() has parsed; "
      "call straight_through()");
  const auto& x = THPVariable_Unpack(args[0]);
  const auto& q = THPVariable_Unpack(args[1]);
  if (THPVariable_Check(args[2])) {
    return THPVariable_Wrap(gradbridge::straight_through(x, q, THPVariable_Unpack(args[2])));
  }
  return THPVariable_Wrap(gradbridge::straight_through(x, q, PyFloat_AS_DOUBLE(args[2])));
  END_HANDLE_TH_ERRORS
}

// gradbridge::rotate_to for parsed arguments: x and q Tensors.
PyObject* rotate_to_parsed(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(
      nargs == 2 && THPVariable_Check(args[0]) && THPVariable_Check(args[1]),
      "_rotate_to_parsed(x, q) takes what rotate_to() has parsed; call rotate_to()");
  return THPVariable_Wrap(gradbridge::rotate_to(THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1])));
  END_HANDLE_TH_ERRORS
}

PyObject* set_strict(PyObject* /*module*/, PyObject* enabled) {
  HANDLE_TH_ERRORS
  const int value = PyObject_IsTrue(enabled);
  if (value < 0) {
    return nullptr;
  }
  return PyBool_FromLong(gradbridge::set_strict(value));
  END_HANDLE_TH_ERRORS
}

PyObject* is_strict(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyBool_FromLong(gradbridge::is_strict());
}

// The docstring is attached from Python (gradbridge_ext/ops.py).
PyMethodDef methods[] = {
    {"bridge", (PyCFunction)(void (*)())bridge_entry, METH_FASTCALL | METH_KEYWORDS, nullptr},
    {"_bridge_parsed", (PyCFunction)(void (*)())bridge_parsed, METH_FASTCALL, nullptr},
    {"straight_through", (PyCFunction)(void (*)())straight_through_entry, METH_FASTCALL | METH_KEYWORDS, nullptr},
    {"_straight_through_parsed", (PyCFunction)(void (*)())straight_through_parsed, METH_FASTCALL, nullptr},
    {"rotate_to", (PyCFunction)(void (*)())rotate_to_entry, METH_FASTCALL | METH_KEYWORDS, nullptr},
    {"_rotate_to_parsed", (PyCFunction)(void (*)())rotate_to_parsed, METH_FASTCALL, nullptr},
    {"_set_strict", set_strict, METH_O, nullptr},
    {"_is_strict", is_strict, METH_NOARGS, nullptr},
    {nullptr, nullptr, 0, nullptr}};

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  if (PyModule_AddFunctions(m.ptr(), methods) < 0) {
    throw pybind11::error_already_set();
  }
}
