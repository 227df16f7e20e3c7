"""Published checkpoints as genbench models: an eps-network adapter and safe loaders.

:class:`EpsAdapter` turns any eps-prediction network with a *named time convention* into a
:class:`~benchmark.zoo.denoiser.Denoiser`, so DiffPure, GAP, DC/RDC and the PF-ODE detector
run on it unchanged. The Denoiser interface hands it the variance-normalized input z and the
log-SNR lambda; the adapter inverts lambda with the schedule of the network's convention
(:meth:`benchmark.zoo.schedules.Schedule.time_from_log_snr`: the one source of the maths) and
calls the network on its own input and time:

==================  ==========================================  ===========================
``time``            the network's time input                     its input x
==================  ==========================================  ===========================
``ddpm``            fractional DDPM index i in [0, T-1] with    z (DDPM is variance-
                    log_snr_DDPM(i) = lambda: exact at integer   preserving)
                    timesteps, linear in lambda between them
``ddpm-round``      that index rounded to the nearest integer   z
``ddpm-diffpure``   floor(T t) with t the VP time of lambda     z
                    (beta 0.1..20), clamped to T-1: DiffPure's
                    ``RevVPSDE._scale_timesteps`` for guided-
                    diffusion eps models
``vp``              ``time_scale`` * t, t the VP time of lambda  z
                    (score_sde's continuous VP models: 999 t)
``subvp``           ``time_scale`` * t, t the subVP time         z sqrt(a^2 + s^2) of subVP
``edm``             ``time_scale`` * sigma, sigma = e^(-lambda/2)  z sqrt(1 + sigma^2)
==================  ==========================================  ===========================

DDPM is linear betas 1e-4..0.02 over T = 1000 (Ho et al.; ``beta_start``, ``beta_end``, ``T``
override it), VP/subVP beta 0.1..20 (``beta_0``, ``beta_1``). The DDPM index of a VP time t is
close to T t - 1 (alphabar_i ~ exp(-B((i + 1) / T))): ``ddpm`` feeds the index whose noise level
is exactly the one asked for, ``ddpm-diffpure`` reproduces DiffPure's floor(T t), which lags it
by about one step. Sources: DiffPure (Nie et al. 2022) ``runners/diffpure_sde.py``
(``(t * N).long()``), score_sde ``models/utils.py`` ``get_score_fn`` (``labels = t * 999`` for
continuous VP models). The output is the same eps whatever the convention (x_native and z carry
the same noise), so it passes through unchanged.

Calling conventions (``call``): ``"diffusers"`` is ``net(x, t, class_labels=y).sample``
(``UNet2DModel``); ``"positional"`` is ``net(x, t)`` or ``net(x, t, y)`` returning a tensor
(guided-diffusion's ``UNetModel(x, timesteps, y)``, score_sde's ``NCSNpp(x, labels)``).
``learned_sigma`` keeps the first C of 2C output channels (guided-diffusion's variance head).

Labels: ``num_classes`` > 0 makes the adapter class-conditional. ``y=None`` (the unconditional
prediction DiffPure and the PF-ODE ask for) goes to ``null_class`` (a class index the network
was trained with as "no label"); a conditional network without one refuses ``y=None``.

Loaders (no pickle is ever unpickled, nothing is downloaded):

* :func:`load_diffusers_folder`: a diffusers ``UNet2DModel`` folder (``config.json`` and
  ``diffusion_pytorch_model.safetensors``), built with ``UNet2DModel.from_config`` from the
  config we read ourselves; a folder with only ``diffusion_pytorch_model.bin`` (a pickle) is
  refused, and so are weights that do not fit the config (missing, unexpected or mis-shaped
  tensors). Old checkpoints' attention names (``query``/``key``/``value``/``proj_attn``) are
  renamed to today's (``to_q``/``to_k``/``to_v``/``to_out.0``) as diffusers itself does.
* :func:`load_state_dict_bytes`: ``.safetensors`` with ``safetensors.torch.load``; ``.pt`` /
  ``.pth`` / ``.bin`` / ``.ckpt`` with ``torch.load(weights_only=True)``, which rebuilds only
  tensors and plain containers and refuses any other global before importing it
  (:class:`UnsafeCheckpointError`).
"""

from __future__ import annotations

import io
import json
import math
import pickle
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmark.zoo import ZooError
from benchmark.zoo.denoiser import Denoiser, _per_sample
from benchmark.zoo.schedules import DDPM, EDM, VPSDE, Schedule, SubVPSDE

__all__ = [
    "DIFFUSERS_CONFIG",
    "DIFFUSERS_WEIGHTS",
    "TIME_CONVENTIONS",
    "EpsAdapter",
    "ExternalModelError",
    "Normalized",
    "UnsafeCheckpointError",
    "load_diffusers_folder",
    "load_state_dict_bytes",
    "select_state_dict",
]

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_DIFFUSERS_PICKLE = "diffusion_pytorch_model.bin"

#: time convention -> what it means (the table of the module docstring).
TIME_CONVENTIONS: dict[str, str] = {
    "ddpm": "DDPM timestep index (fractional: the exact noise level), T = 1000 linear betas",
    "ddpm-round": "DDPM timestep index rounded to an integer",
    "ddpm-diffpure": "floor(T t) of the VP time t, as DiffPure's RevVPSDE feeds guided-diffusion",
    "vp": "continuous VP time t * time_scale (score_sde: 999)",
    "subvp": "continuous subVP time t * time_scale (score_sde: 999)",
    "edm": "EDM sigma * time_scale, input x0 + sigma eps",
}
_CALLS = ("diffusers", "positional")


class ExternalModelError(ZooError):
    """A published checkpoint that cannot be loaded; the message names the file and the fix."""


class UnsafeCheckpointError(ExternalModelError):
    """A pickled checkpoint that holds something other than tensors (it was not run)."""


def _check_choice(value: object, choices: Mapping[str, Any] | tuple[str, ...], what: str) -> str:
    from benchmark.plugins.suggest import did_you_mean

    if not isinstance(value, str) or value not in choices:
        names = sorted(choices)
        hint = did_you_mean(str(value), names, n=1, cutoff=0.5)
        raise ValueError(f"unknown {what} {value!r}{hint} (expected one of {', '.join(names)})")
    return value


class EpsAdapter(Denoiser):
    """A :class:`Denoiser` over an eps-prediction network ``net`` (see the module docstring).

    Keyword arguments: ``time`` (a :data:`TIME_CONVENTIONS` name), ``call`` (``"diffusers"`` or
    ``"positional"``), ``time_scale`` (``vp``/``subvp``: 999, score_sde's; ``edm``: 1),
    ``num_classes`` (0: unconditional), ``null_class`` (the label index standing for "no
    label"), ``learned_sigma``, ``in_channels`` and ``image_size`` (the image shape the defenses
    read), and the schedule's parameters ``T``, ``beta_start``, ``beta_end`` (DDPM) and
    ``beta_0``, ``beta_1`` (VP, subVP; also DiffPure's map).
    """

    #: conventions whose network input is x_t itself equal to z (variance-preserving).
    _VP_INPUT: ClassVar[frozenset[str]] = frozenset({"ddpm", "ddpm-round", "ddpm-diffpure",
                                                     "vp"})

    def __init__(self, net: nn.Module, *, time: str = "ddpm", call: str = "positional",
                 time_scale: float | None = None, num_classes: int = 0,
                 null_class: int | None = None, learned_sigma: bool = False,
                 in_channels: int | None = None, image_size: int | None = None,
                 T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,  # noqa: N803
                 beta_0: float = 0.1, beta_1: float = 20.0) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
        self.time = _check_choice(time, TIME_CONVENTIONS, "time convention")
        self.call = _check_choice(call, _CALLS, "calling convention")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        if null_class is not None and (isinstance(null_class, bool)
                                       or not isinstance(null_class, int) or null_class < 0):
            raise ValueError(f"null_class must be a label index >= 0 or None, got {null_class!r}")
        if null_class is not None and num_classes == 0:
            raise ValueError("null_class is set but num_classes is 0 (an unconditional network "
                             "takes no labels)")
        if null_class is not None and null_class < num_classes:
            raise ValueError(f"null_class={null_class} is one of the real classes "
                             f"0..{num_classes - 1}; it must be an index of its own")
        self.net = net
        self.num_classes = int(num_classes)
        self.conditional = num_classes > 0
        self.null_class = null_class
        self.learned_sigma = bool(learned_sigma)
        default_scale = 999.0 if self.time in ("vp", "subvp") else 1.0
        self.time_scale = float(default_scale if time_scale is None else time_scale)
        if not math.isfinite(self.time_scale) or self.time_scale <= 0:
            raise ValueError(f"time_scale must be a positive number, got {time_scale!r}")
        if in_channels is not None:
            self.in_channels = int(in_channels)
        if image_size is not None:
            self.image_size = int(image_size)
        self.ddpm = DDPM(beta_start=beta_start, beta_end=beta_end, T=T)
        self.vp = VPSDE(beta_0=beta_0, beta_1=beta_1, eps_t=0.0)
        self.subvp = SubVPSDE(beta_0=beta_0, beta_1=beta_1, eps_t=0.0)
        self.edm = EDM()

    # -- the map from log-SNR to the network's own time and input scale -------------------------
    def native_schedule(self) -> Schedule:
        """The schedule whose time the network takes (DDPM for the ``ddpm*`` conventions)."""
        return {"vp": self.vp, "subvp": self.subvp, "edm": self.edm}.get(self.time, self.ddpm)

    def network_time(self, log_snr: Tensor) -> Tensor:
        """The network's time input for per-sample log-SNRs (float64, shape of ``log_snr``)."""
        if self.time == "ddpm":
            return self.ddpm.time_from_log_snr(log_snr)
        if self.time == "ddpm-round":
            return torch.round(self.ddpm.time_from_log_snr(log_snr))
        if self.time == "ddpm-diffpure":
            # floor(T t); T t within DDPM.SNAP of an integer is that integer (t comes back from a
            # float32 log-SNR, and DiffPure's grid t = t* - i dt lands on the integers)
            u = self.vp.time_from_log_snr(log_snr) * self.ddpm.T
            near = torch.round(u)
            u = torch.where((u - near).abs() < DDPM.SNAP, near, u)
            return torch.floor(u).clamp(0, self.ddpm.T - 1)
        return self.native_schedule().time_from_log_snr(log_snr) * self.time_scale

    def input_scale(self, log_snr: Tensor) -> Tensor:
        """sqrt(a^2 + s^2) of the native process at the matching time: x_native = scale * z."""
        if self.time in self._VP_INPUT:
            return torch.ones_like(log_snr, dtype=torch.float64)
        sched = self.native_schedule()
        a, s = sched.alpha_sigma(sched.time_from_log_snr(log_snr))
        return torch.sqrt(a * a + s * s)

    # -- the Denoiser interface ---------------------------------------------------------------
    def eps_normalized(self, z: Tensor, log_snr: Tensor, y: Tensor | None) -> Tensor:
        lam = torch.nan_to_num(log_snr.detach().to(torch.float64), nan=0.0)
        t_net = self.network_time(lam).to(torch.float32)
        x = z if self.time in self._VP_INPUT else z * _per_sample(
            self.input_scale(lam).to(z.dtype), z)
        labels = self._labels(y, z.shape[0], z.device)
        out = self.raw(x, t_net, labels)
        if self.learned_sigma:
            if out.shape[1] != 2 * z.shape[1]:
                raise RuntimeError(f"learned_sigma=True but the network returned {out.shape[1]} "
                                   f"channels for {z.shape[1]} input channels (expected "
                                   f"{2 * z.shape[1]})")
            out = out[:, : z.shape[1]]
        elif out.shape[1:] != z.shape[1:] and out.shape[1] == 2 * z.shape[1]:
            raise RuntimeError(f"the network returned {out.shape[1]} channels for "
                               f"{z.shape[1]}: a learned-variance head? set learned_sigma "
                               f"(--learned-sigma) to keep the eps half")
        return out

    def _labels(self, y: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        if not self.conditional:
            return None
        if y is not None:
            return y
        if self.null_class is None:
            raise ValueError(
                f"this class-conditional network ({self.num_classes} classes) has no null class, "
                f"so it cannot give the unconditional prediction (y=None) that DiffPure, GAP and "
                f"the PF-ODE ask for; register it with a null_class (the label index it was "
                f"trained with as 'no label') or use an unconditional network")
        return torch.full((batch,), self.null_class, dtype=torch.long, device=device)

    def raw(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        """The wrapped network on its own input ``x`` and time ``t`` (B,), eps out (no nfe).

        Under autograd, attention runs as the math kernel: the fused kernels (flash,
        memory-efficient; diffusers' UNets call them) have no double backward, and genbench
        differentiates gradients again (GAP's guidance, RDC's likelihood maximization and the
        PF-ODE divergence under an exact attack gradient), which a forward cannot foresee. The
        math kernel is the same function; no-grad forwards (scoring) keep the fused ones."""
        with sdpa_kernel([SDPBackend.MATH]) if torch.is_grad_enabled() else nullcontext():
            if self.call == "diffusers":
                kwargs = {} if labels is None else {"class_labels": labels}
                out = self.net(x, t, **kwargs)
                out = getattr(out, "sample", out)
            else:
                out = self.net(x, t) if labels is None else self.net(x, t, labels)
        if isinstance(out, tuple | list):
            out = out[0]
        if not isinstance(out, Tensor):
            raise TypeError(f"the wrapped network returned {type(out).__name__}, not a tensor")
        return out

    def extra_repr(self) -> str:
        return (f"time={self.time!r}, call={self.call!r}, time_scale={self.time_scale:g}, "
                f"num_classes={self.num_classes}, null_class={self.null_class}")


class Normalized(nn.Module):
    """``net((x - mean) / std)``: normalization inside the model, as public classifiers expect
    (images in [0, 1] go in). ``num_classes`` is copied from ``net`` when it has one."""

    mean: Tensor  # buffers (declared for type checkers)
    std: Tensor

    def __init__(self, net: nn.Module, mean: Any, std: Any) -> None:
        super().__init__()
        m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        if m.shape != s.shape:
            raise ValueError(f"mean and std must have the same length, got {m.numel()} and "
                             f"{s.numel()}")
        if bool((s <= 0).any()):
            raise ValueError(f"std must be > 0, got {s.flatten().tolist()}")
        self.net = net
        self.register_buffer("mean", m, persistent=False)
        self.register_buffer("std", s, persistent=False)
        if hasattr(net, "num_classes"):
            self.num_classes = net.num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)


# -- loaders ------------------------------------------------------------------------------------
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar")


def load_state_dict_bytes(data: bytes, path: Path) -> Any:
    """The object stored in ``data`` (the bytes of ``path``): safetensors by suffix, else a
    ``torch.save`` file read with ``weights_only=True`` (a pickle with code is refused)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise ExternalModelError(f"{path}: not a readable safetensors file ({exc})") from exc
    if path.suffix not in _PICKLE_SUFFIXES:
        raise ExternalModelError(f"{path}: unknown weights format {path.suffix!r} (expected "
                                 f".safetensors or one of {', '.join(_PICKLE_SUFFIXES)})")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpointError(
            f"{path}: refused: the checkpoint is a pickle holding more than tensors, and "
            f"genbench loads pickles only with torch.load(weights_only=True), which does not "
            f"run or import what they name ({first}). Convert it to safetensors where you "
            f"trust it, or save only its state_dict") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise ExternalModelError(f"{path}: not a readable torch checkpoint ({exc})") from exc


def select_state_dict(obj: Any, path: Path, *, key: str = "",
                      strip_prefix: str = "") -> dict[str, Tensor]:
    """The tensor mapping inside a loaded checkpoint: ``obj[key]`` (dotted keys descend, e.g.
    ``"state_dict"`` or ``"ema.model"``), with ``strip_prefix`` (``"module."`` of a
    DataParallel checkpoint) removed from every name that starts with it."""
    for part in [p for p in key.split(".") if p] if key else []:
        if not isinstance(obj, Mapping) or part not in obj:
            have = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise ExternalModelError(f"{path}: no entry {part!r} (of state_dict_key {key!r}); "
                                     f"the checkpoint holds {have}")
        obj = obj[part]
    if not isinstance(obj, Mapping) or not obj:
        raise ExternalModelError(f"{path}: expected a mapping of parameter names to tensors, got "
                                 f"{type(obj).__name__}; name the entry holding it with "
                                 f"state_dict_key")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        top = ", ".join(repr(k) for k in sorted(map(str, obj))[:8])
        raise ExternalModelError(f"{path}: entries {bad[:5]} are not tensors (top-level keys: "
                                 f"{top}); name the entry holding the weights with "
                                 f"state_dict_key (e.g. 'state_dict')")
    out: dict[str, Tensor] = {}
    for k, v in obj.items():
        name = str(k)
        if strip_prefix and name.startswith(strip_prefix):
            name = name[len(strip_prefix):]
        out[name] = v
    return out


def load_into(model: nn.Module, state: Mapping[str, Tensor], where: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with an error that lists what disagrees."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch", shapes)):
            if items:
                more = f" (and {len(items) - 4} more)" if len(items) > 4 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:4])}{more}")
        raise ExternalModelError(f"{where}: the weights do not fit the architecture: "
                                 + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def _rename_old_attention(state: dict[str, Tensor], own: Mapping[str, Any]) -> dict[str, Tensor]:
    """Old diffusers attention names -> today's, only where the new name is a model key."""
    renames = ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."),
               (".proj_attn.", ".to_out.0."))
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        new = k
        if k not in own:
            for old, repl in renames:
                cand = k.replace(old, repl)
                if cand != k and cand in own:
                    new = cand
                    break
        out[new] = v
    return out


def read_diffusers_config(folder: Path) -> bytes:
    """The bytes of the folder's ``config.json`` (a clear error if it is absent)."""
    path = folder / DIFFUSERS_CONFIG
    if not path.is_file():
        raise ExternalModelError(f"{folder}: no {DIFFUSERS_CONFIG}; a diffusers model folder "
                                 f"holds {DIFFUSERS_CONFIG} and {DIFFUSERS_WEIGHTS} "
                                 f"(UNet2DModel.save_pretrained writes both)")
    return path.read_bytes()


def parse_diffusers_config(data: bytes, path: Path) -> dict[str, Any]:
    """A ``UNet2DModel`` config from the bytes of ``path`` (a clear error if malformed)."""
    try:
        config = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExternalModelError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ExternalModelError(f"{path}: expected a JSON object, got {type(config).__name__}")
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ExternalModelError(f"{path}: _class_name is {cls!r}; genbench loads diffusers "
                                 f"UNet2DModel folders only")
    return config


def diffusers_weights_path(folder: Path) -> Path:
    """The folder's safetensors weights; a pickle-only folder is refused with the reason."""
    path = folder / DIFFUSERS_WEIGHTS
    if path.is_file():
        return path
    if (folder / _DIFFUSERS_PICKLE).is_file():
        raise UnsafeCheckpointError(
            f"{folder}: only {_DIFFUSERS_PICKLE} (a pickle) is there; genbench reads diffusers "
            f"weights from {DIFFUSERS_WEIGHTS} only. Convert it where you trust it "
            f"(UNet2DModel.from_pretrained(folder).save_pretrained(folder, "
            f"safe_serialization=True))")
    raise ExternalModelError(f"{folder}: no {DIFFUSERS_WEIGHTS} (a diffusers model folder holds "
                             f"{DIFFUSERS_CONFIG} and {DIFFUSERS_WEIGHTS})")


def unet2d_class() -> Any:
    """diffusers' ``UNet2DModel`` (the optional dependency ``genbench[diffusers]``).

    diffusers imports torchvision when it is installed; a torchvision wheel built for another
    torch (the CUDA wheel beside a CPU torch: its ops fail to register) would make that import
    fail although the UNet does not use it, so diffusers is then told torchvision is absent."""
    try:
        import diffusers.utils.import_utils as diffusers_imports
    except ImportError as exc:
        raise ImportError(f"loading a diffusers model needs the optional dependency: pip "
                          f"install 'genbench[diffusers]' ({exc})") from exc
    if diffusers_imports.is_torchvision_available():
        try:
            import torchvision  # noqa: F401
        except Exception:
            diffusers_imports._torchvision_available = False
    from diffusers import UNet2DModel

    return UNet2DModel


def build_diffusers_unet(config: Mapping[str, Any], where: str) -> nn.Module:
    """``UNet2DModel.from_config(config)``: no hub access, no weights read."""
    try:
        UNet2DModel = unet2d_class()
    except ImportError as exc:
        raise ExternalModelError(f"{where}: {exc}") from exc
    try:
        net: nn.Module = UNet2DModel.from_config(dict(config))
        return net
    except (TypeError, ValueError, KeyError) as exc:
        raise ExternalModelError(f"{where}: UNet2DModel cannot be built from its config: "
                                 f"{exc}") from exc


def load_diffusers_folder(folder: Path, weights: bytes, config: Mapping[str, Any]) -> nn.Module:
    """A ``UNet2DModel`` built from ``config`` with the safetensors ``weights`` (their bytes,
    already hash-checked by the caller), strictly: see the module docstring."""
    from safetensors.torch import load as load_safetensors

    net = build_diffusers_unet(config, str(folder))
    try:
        state = load_safetensors(weights)
    except Exception as exc:
        raise ExternalModelError(f"{folder / DIFFUSERS_WEIGHTS}: not a readable safetensors "
                                 f"file ({exc})") from exc
    state = _rename_old_attention(dict(state), net.state_dict())
    load_into(net, state, f"{folder}: {DIFFUSERS_CONFIG} and {DIFFUSERS_WEIGHTS} disagree")
    return net


def diffusers_adapter_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """What an :class:`EpsAdapter` reads from a ``UNet2DModel`` config: image shape, classes."""
    kw: dict[str, Any] = {"call": "diffusers", "in_channels": int(config.get("in_channels", 3))}
    size = config.get("sample_size")
    if isinstance(size, int):
        kw["image_size"] = size
    elif isinstance(size, list | tuple) and len(size) == 2 and size[0] == size[1]:
        kw["image_size"] = int(size[0])
    embed = config.get("class_embed_type")
    n = config.get("num_class_embeds")
    if embed == "identity":
        raise ExternalModelError("class_embed_type 'identity' takes embedding vectors, not "
                                 "labels; genbench supports num_class_embeds (an embedding "
                                 "table) and class_embed_type 'timestep'")
    if n:
        kw["num_class_embeds"] = int(n)
    return kw
