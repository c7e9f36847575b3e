// The Python entry point: gradbridge_ext._C.bridge.

#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/python_arg_parser.h>
#include <torch/extension.h>

#include "bridge.h"

namespace {

// torch._C._disabled_torch_function_impl, which nn.Parameter uses to opt out.
PyObject* disabled_torch_function = nullptr;

// Whether a torch function called with obj must defer to __torch_function__
// (a TorchFunctionMode, a Tensor subclass, an fx Proxy). torch's own check is
// not exported to extensions; this one follows it.
bool has_torch_function(PyObject* obj) {
  using at::impl::PythonTorchFunctionTLS;
  if (at::impl::torch_function_mode_enabled()) {
    return true;
  }
  if (THPVariable_CheckExact(obj) ||
      PythonTorchFunctionTLS::get_disabled_state() !=
          at::impl::TorchFunctionDisabledState::ENABLED) {
    return false;
  }
  auto impl = THPObjectPtr(
      PyObject_GetAttrString((PyObject*)Py_TYPE(obj), "__torch_function__"));
  if (!impl) {
    PyErr_Clear();
    return false;
  }
  return impl.get() != disabled_torch_function;
}

// NB: bridge sits on a model's forward path, once per step or per layer, so its
// entry is a bare METH_O function: no argument parser and no pybind11 casters,
// which would cost more than the alias itself.
PyObject* bridge(PyObject* module, PyObject* t) {
  HANDLE_TH_ERRORS
  // Subclasses, modes and fx tracing see bridge as they see torch functions.
  if (has_torch_function(t)) {
    auto api = THPObjectPtr(PyObject_GetAttrString(module, "bridge"));
    auto args = THPObjectPtr(PyTuple_Pack(1, t));
    if (!api || !args) {
      return nullptr;
    }
    return torch::handle_torch_function_no_python_arg_parser(
        {t}, args.get(), nullptr, "bridge", api.get(), "gradbridge_ext");
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
  // Kept for the life of the process, as torch._C keeps it.
  pybind11::object disabled = pybind11::module_::import("torch._C").attr(
      "_disabled_torch_function_impl");
  disabled_torch_function = disabled.release().ptr();
  if (PyModule_AddFunctions(m.ptr(), methods) < 0) {
    throw pybind11::error_already_set();
  }
}
