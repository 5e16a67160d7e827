"""An accelerator emulated on the CPU, for tests that catch a host/device mix without a GPU.

    with emulated_device():            # inside: device="meta" means the emulated accelerator
        grpo.main(grpo.GRPOConfig(device="meta", ...))

A tensor on the emulated device is a real CPU tensor wrapped in a subclass that reports the meta
device (the one non-CPU device every torch build has, autograd included), so the numbers are the CPU
run's (Module.to swaps each parameter in place, as torch does for subclasses such as DTensor, so tied
weights stay tied). Every op on such a tensor checks what CUDA checks: every other tensor argument is on the
emulated device too, or is a 0-dim CPU tensor (a scalar). An op that mixes a host tensor into device
math raises DeviceMix, naming the op, where a real GPU run would raise "Expected all tensors to be on
the same device". Creating (device=) and moving (.to, .cpu, copy_) tensors follow torch's rules.
"""
import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

DEVICE = torch.device("meta")
aten = torch.ops.aten

# Ops that may mix devices on CUDA too: moves and copies, and index tensors of advanced indexing
MOVES = {aten._to_copy.default, aten.copy_.default}
INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


class DeviceMix(RuntimeError):
    pass


class OnDevice(torch.Tensor):
    """A CPU tensor (`elem`) that says it lives on the emulated device."""

    @staticmethod
    def __new__(cls, elem):
        t = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                layout=elem.layout, device=DEVICE, requires_grad=elem.requires_grad)
        t.elem = elem
        return t

    def __repr__(self):
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _run(func, args, kwargs):
    leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    on_device = any(isinstance(t, OnDevice) for t in leaves)
    if any(t.is_meta and not isinstance(t, OnDevice) for t in leaves):   # a way in that bypassed the wrapping
        raise RuntimeError(f"device_emulation: {func} got a real meta tensor (no data); wrap its source")
    if kwargs.get("device") is not None:          # a factory, or .to(device): the result goes there
        on_device = torch.device(kwargs["device"]).type == DEVICE.type
        kwargs = {**kwargs, "device": torch.device("cpu")}
    elif func is aten.copy_.default:              # dst.copy_(src): src may live anywhere
        on_device = isinstance(args[0], OnDevice)
    elif on_device and func not in MOVES:
        checked = leaves if func not in INDEXING else [args[0]] + [a for a in args[2:] if isinstance(a, torch.Tensor)]
        host = [tuple(t.shape) for t in checked if not isinstance(t, OnDevice) and t.dim() > 0]
        if host:
            raise DeviceMix(f"{func}: host tensor(s) of shape {host} mixed with tensors on the device")
    unwrap = lambda t: t.elem if isinstance(t, OnDevice) else t
    plain_args, plain_kwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
    out = func(*plain_args, **plain_kwargs)
    if not on_device:
        return out
    # in-place and out= ops return one of their arguments: give back that same wrapper
    inputs = {id(unwrap(t)): t for t in tree_leaves((args, kwargs)) if isinstance(t, OnDevice)}
    wrap = lambda t: (inputs[id(t)] if id(t) in inputs else OnDevice(t)) if isinstance(t, torch.Tensor) else t
    return tree_map(wrap, out)


class _Mode(TorchDispatchMode):
    """Routes ops on plain tensors too, so that factories and moves to the emulated device wrap."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


class _Factories(TorchFunctionMode):
    """torch.tensor(data, device="meta") never reaches the dispatcher with its data (torch makes an
    empty meta tensor directly): build it on the host, then move it, which the dispatcher sees."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type == DEVICE.type:
            return func(*args, **{**kwargs, "device": "cpu"}).to(DEVICE)
        if func is torch.Tensor.tolist and isinstance(args[0], OnDevice):   # (torch refuses subclasses)
            return args[0].cpu().tolist()
        return func(*args, **kwargs)


@contextlib.contextmanager
def emulated_device():
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)   # param.data = subclass is refused
    try:
        with _Factories(), _Mode():
            yield DEVICE
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
