// The Python entry point: gradbridge_ext._C.bridge.

#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>
#include <torch/csrc/utils/pybind.h>  // not torch/extension.h: the C++ frontend (nn, optim) it brings doubles the compile time

#include <vector>

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

// torch's check also answers yes for a class that defines __torch_function__,
// torch.Tensor itself included, although no override applies to a class passed
// as an argument; unless a mode is on, refuse it as any other non-tensor.
bool defers_to_torch_function(PyObject* obj) {
  return has_torch_function(obj) &&
      (!PyType_Check(obj) || at::impl::torch_function_mode_enabled());
}

PyObject* type_error_for_tensor(PyObject* t) {
  return PyErr_Format(
      PyExc_TypeError,
      "bridge(): argument 't' must be a torch.Tensor, not %s",
      Py_TYPE(t)->tp_name);
}

// Reads bridge's options from a vectorcall: grad_scale (positional or keyword;
// a number, or a tensor left in scale_tensor) and attach (keyword only; None
// means attached iff grad_scale != 0).
bool parse_options(
    PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames,
    double& grad_scale, PyObject*& scale_tensor, bool& attach) {
  if (nargs == 0) {
    PyErr_SetString(
        PyExc_TypeError, "bridge() missing its first argument t (positional only)");
    return false;
  }
  if (nargs > 2) {
    PyErr_Format(
        PyExc_TypeError,
        "bridge() takes 1 or 2 positional arguments (t, grad_scale) but %zd were given",
        nargs);
    return false;
  }
  PyObject* scale = nargs == 2 ? args[1] : nullptr;
  PyObject* attach_obj = Py_None;
  const Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
  for (Py_ssize_t i = 0; i < nkw; ++i) {
    PyObject* name = PyTuple_GET_ITEM(kwnames, i);
    PyObject* value = args[nargs + i];
    if (PyUnicode_CompareWithASCIIString(name, "grad_scale") == 0 && !scale) {
      scale = value;
    } else if (PyUnicode_CompareWithASCIIString(name, "attach") == 0) {
      attach_obj = value;
    } else {
      PyErr_Format(
          PyExc_TypeError,
          "bridge() got an unexpected or repeated keyword argument '%U'; it takes "
          "t, grad_scale=0.0 and, by keyword, attach=None",
          name);
      return false;
    }
  }
  grad_scale = 0;
  if (scale && THPVariable_Check(scale)) {
    scale_tensor = scale;
  } else if (scale) {
    // A bool is most likely meant for attach; anything with __float__ (numpy
    // scalars) is a number.
    const bool is_bool = PyBool_Check(scale);
    grad_scale = is_bool ? 0 : PyFloat_AsDouble(scale);
    if (!is_bool && grad_scale == -1 && PyErr_Occurred()) {
      if (PyErr_ExceptionMatches(PyExc_OverflowError)) {  // an int past float's range
        PyErr_Clear();
        PyErr_SetString(
            PyExc_ValueError,
            "gradbridge::bridge: grad_scale must be a finite number, got an int too large for a float");
        return false;
      }
      if (!PyErr_ExceptionMatches(PyExc_TypeError)) {
        return false;  // raised by the object's own __float__: let it through, as float() does
      }
    }
    if (is_bool || PyErr_Occurred()) {
      PyErr_Clear();
      PyErr_Format(
          PyExc_TypeError,
          "bridge(): argument 'grad_scale' must be a number, not %s%s",
          Py_TYPE(scale)->tp_name,
          is_bool ? " (attach=True is a keyword argument)" : "");
      return false;
    }
  }
  const bool needs_graph = scale_tensor || grad_scale != 0;
  if (attach_obj == Py_None) {
    attach = needs_graph;
  } else if (PyBool_Check(attach_obj)) {
    attach = attach_obj == Py_True;
    if (!attach && needs_graph) {
      PyErr_Format(
          PyExc_ValueError,
          "bridge(): attach=False cuts the graph, but grad_scale=%R needs it; "
          "leave attach out",
          scale);
      return false;
    }
  } else {
    PyErr_Format(
        PyExc_TypeError,
        "bridge(): argument 'attach' must be a bool or None, not %s",
        Py_TYPE(attach_obj)->tp_name);
    return false;
  }
  return true;
}

// NB: bridge sits on a model's forward path, once per step or per layer, so its
// entry is a bare vectorcall function: no argument parser and no pybind11
// casters, which would cost more than the alias itself; bridge(t), the cut,
// reads one argument and nothing else.
PyObject* bridge(
    PyObject* module, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  HANDLE_TH_ERRORS
  double grad_scale = 0;
  PyObject* scale_tensor = nullptr;
  bool attach = false;
  const bool cut = nargs == 1 && !kwnames;
  if (!cut && !parse_options(args, nargs, kwnames, grad_scale, scale_tensor, attach)) {
    return nullptr;
  }
  PyObject* t = args[0];
  // TorchFunctionModes, Tensor subclasses and fx Proxies see bridge as they see
  // a torch function; torch.overrides picks which of them answer.
  if (defers_to_torch_function(t)) {
    // handle_torch_function(api, (t,), *args, **kwargs), as a vectorcall.
    auto api = THPObjectPtr(PyObject_GetAttrString(module, "bridge"));
    auto relevant = THPObjectPtr(PyTuple_Pack(1, t));
    if (!api || !relevant) {
      return nullptr;
    }
    const Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    std::vector<PyObject*> call{api.get(), relevant.get()};
    call.insert(call.end(), args, args + nargs + nkw);
    return PyObject_Vectorcall(handle_torch_function, call.data(), nargs + 2, kwnames);
  }
  if (!THPVariable_Check(t)) {
    return type_error_for_tensor(t);
  }
  if (scale_tensor) {
    return THPVariable_Wrap(
        gradbridge::bridge(THPVariable_Unpack(t), THPVariable_Unpack(scale_tensor)));
  }
  return THPVariable_Wrap(
      gradbridge::bridge(THPVariable_Unpack(t), grad_scale, attach));
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

// The docstring is attached from Python (gradbridge_ext/__init__.py).
PyMethodDef methods[] = {
    {"bridge", (PyCFunction)(void (*)())bridge, METH_FASTCALL | METH_KEYWORDS, nullptr},
    {"_set_strict", set_strict, METH_O, nullptr},
    {"_is_strict", is_strict, METH_NOARGS, nullptr},
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
