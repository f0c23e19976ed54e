"""Reversible changes to a model, recorded once for every adapter.

Patching gives a module the behaviour of a mixin by swapping its class for a subclass of
both (tomesd's approach): weights, buffers and ``state_dict`` keys are untouched. A
:class:`Patch` records every class swap, hook and attribute one ``pitome.patch`` made, so
that unpatching, re-patching, nesting, copying and pickling are written here and nowhere
else. The merging classes are made on demand but pickle by their mixin and base class, so a
patched model survives ``torch.save``/``torch.load`` and ``copy.deepcopy``.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

PATCH_ATTR = "_pitome_patch"
_PARENT = "_pitome_parent"
_MIXIN = "_pitome_mixin"
_CLASSES: dict[tuple[type, type], type] = {}


def class_names(module: nn.Module) -> set[str]:
    """Names of every class in the module's MRO."""
    return {cls.__name__ for cls in type(module).__mro__}


def is_swapped(module: nn.Module) -> bool:
    """Whether ``module``'s class is a merging class made by :func:`merging_class`."""
    return _PARENT in type(module).__dict__


def merging_class(mixin: type, base: type) -> type:
    """The class with ``mixin``'s behaviour on top of ``base`` (made once per pair)."""
    key = (mixin, base)
    if key not in _CLASSES:
        cls = type(f"Merging{base.__name__}", (mixin, base),
                   {_PARENT: base, _MIXIN: mixin, "__reduce_ex__": _reduce_ex,
                    "__module__": mixin.__module__})
        forward = next((owner.__dict__["forward"] for owner in mixin.__mro__
                        if "forward" in owner.__dict__), None)
        if forward is not None:
            # transformers' GradientCheckpointingLayer checkpoints a layer itself: before 5.20
            # or so in its __call__, since then by wrapping a subclass's forward when the class
            # is made. Merging layers checkpoint themselves (the merge state must be replayed
            # inside the forward's session), so both are undone.
            cls.forward = forward
            if any(owner.__name__ == "GradientCheckpointingLayer" and "__call__" in owner.__dict__
                   for owner in base.__mro__):
                cls.__call__ = nn.Module.__call__
        _CLASSES[key] = cls
    return _CLASSES[key]


def _reduce_ex(module: nn.Module, protocol: int) -> tuple[Any, ...]:
    cls = type(module)
    return _rebuild, (cls.__dict__[_MIXIN], cls.__dict__[_PARENT]), module.__dict__.copy()


def _rebuild(mixin: type, base: type) -> nn.Module:
    """Unpickling and copying: an empty module of the merging class; its state follows."""
    return object.__new__(merging_class(mixin, base))


def original_class(module: nn.Module) -> type:
    """The class ``module`` had before patching."""
    cls = type(module)
    return cls.__dict__[_PARENT] if _PARENT in cls.__dict__ else cls


class Patch:
    """Everything one ``pitome.patch`` changed in a model, so that ``unpatch`` undoes it.

    Attributes:
        adapter: the name of the adapter that made it.
        runtime: the :class:`~pitome.runtime.session.Runtime` the patched blocks share.
    """

    def __init__(self, adapter: str, runtime: Any) -> None:
        self.adapter = adapter
        self.runtime = runtime
        self.swapped: list[nn.Module] = []
        self.hooks: list[RemovableHandle] = []
        self.attributes: list[tuple[nn.Module, str]] = []

    def swap(self, module: nn.Module, mixin: type) -> None:
        if is_swapped(module):
            raise RuntimeError(f"{type(module).__name__} is already patched")
        module.__class__ = merging_class(mixin, type(module))
        self.swapped.append(module)

    def set(self, module: nn.Module, name: str, value: Any) -> None:
        """Attach ``value`` to ``module`` outside its parameters, buffers and submodules."""
        module.__dict__[name] = value
        self.attributes.append((module, name))

    def hook(self, handle: RemovableHandle) -> None:
        self.hooks.append(handle)

    def undo(self) -> None:
        for handle in self.hooks:
            handle.remove()
        for module, name in self.attributes:
            module.__dict__.pop(name, None)
        for module in self.swapped:
            module.__class__ = original_class(module)
        self.hooks, self.attributes, self.swapped = [], [], []


def patch_of(model: nn.Module) -> Patch | None:
    """The patch applied to ``model`` itself (not to one of its submodules), if any."""
    return model.__dict__.get(PATCH_ATTR)


def apply(model: nn.Module, patch: Patch) -> None:
    model.__dict__[PATCH_ATTR] = patch


def remove(model: nn.Module) -> bool:
    """Undo the patch of ``model``; returns whether there was one."""
    patch = model.__dict__.pop(PATCH_ATTR, None)
    if patch is None:
        return False
    patch.undo()
    return True


def clear_for(model: nn.Module) -> None:
    """Make ``model`` ready for a new patch: remove its own patch and those of its
    submodules (patching a model replaces any patch inside it). Raises, changing nothing,
    when ``model`` is itself part of a model patched as a whole."""
    owned = [module for module in model.modules() if patch_of(module) is not None]
    claimed = {id(swapped) for owner in owned for swapped in patch_of(owner).swapped}
    foreign = [name for name, module in model.named_modules()
               if is_swapped(module) and id(module) not in claimed]
    if foreign:
        raise ValueError(
            f"this {type(model).__name__} is part of a model that pitome.patch merged as a whole "
            f"(its {foreign[0] or 'root'} is patched from outside it); call pitome.unpatch on "
            "that model first, or patch that model again with the new settings")
    for module in owned:
        remove(module)
