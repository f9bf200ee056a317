"""The three roles every algorithm is written against: Teacher, Generator, Critic.

- ``Teacher``: frozen, eval mode, no grad; ``predict`` with classifier-free guidance.
- ``Generator``: a 1..K-step sampler, initialised as a copy of a denoiser; returns x0.
- ``Critic``: the fake-score denoiser (a trainable copy of the teacher's denoiser, or LoRA adapters on it).

A LoRA generator and a LoRA critic put their own named adapters (``lora.ADAPTER``,
``lora.CRITIC_ADAPTER``) into the teacher's network: one copy of the base. Each role computes
inside ``lora.active_adapter`` (the teacher with none, each other role with its own alone), and a
role's parameters are its own: another role's adapter in the shared network is not among them
(``SharedBaseRole``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from stepdistill.adapters import GuidanceAdapters
from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.base import Denoiser
from stepdistill.denoisers.guidance_embedding import add_guidance_embedding, embedding_dim
from stepdistill.guidance import draw_scale, guided_predict, parse_scale
from stepdistill.heads import DiscriminatorHead
from stepdistill.lora import ADAPTER, CRITIC_ADAPTER, active_adapter, adapter_of, add_lora, has_lora
from stepdistill.sampling import ode_sample, renoise_sample
from stepdistill.schedules import NoiseSchedule, Prediction


class Teacher(nn.Module):
    """A frozen denoiser with classifier-free guidance.

    Args:
        denoiser: the teacher network (it is frozen in place).
        guidance_scale: default CFG scale s in ``u + s (c - u)``; 1 means no guidance; a range
            ``[lo, hi]`` draws a scale per sample at every call (random-scale CFG, ``guidance``).
    """

    def __init__(self, denoiser: Denoiser, guidance_scale: float | tuple[float, float] = 1.0) -> None:
        super().__init__()
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.guidance_scale = parse_scale(guidance_scale, "teacher.guidance_scale")

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule

    def train(self, mode: bool = True) -> Teacher:  # a teacher never leaves eval mode
        return super().train(False)

    def predict(self, x_t: Tensor, t: Tensor | float, cond: Conditioning, *,
                out: Prediction = Prediction.X0, guidance_scale: float | Tensor | None = None,
                grad: bool = False) -> Tensor:
        """The guided prediction in ``out`` at (x_t [B, ...], t [B], cond), computed by the base network
        (LoRA roles sharing it have their adapters off). Without autograd unless ``grad`` (and grad
        mode is on): then gradients flow to ``x_t`` (SiD's ``grad_through_scores``), never to the
        frozen weights."""
        scale = draw_scale(self.guidance_scale if guidance_scale is None else guidance_scale, len(x_t), x_t.device)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()), active_adapter(self.denoiser.backbone, None):
            return guided_predict(self.denoiser, x_t, t, cond, scale, out=out)

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """The teacher's own weights: LoRA adapters that roles injected into its network are theirs
        (so ``teacher.requires_grad_(False)`` never freezes a LoRA generator or critic)."""
        for name, p in super().named_parameters(prefix, recurse, remove_duplicate):
            if adapter_of(name) is None:
                yield name, p

    def base_parameters(self) -> list[nn.Parameter]:
        """The teacher's own weights (not a LoRA student's adapters injected into its network:
        ``named_parameters`` leaves those out)."""
        return [p for _, p in self.named_parameters()]

    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Conditioning, steps: int, *,
               guidance_scale: float | None = None, progress: bool = False) -> Tensor:
        """The teacher's ODE sample (DDIM for VP, Euler for flow) with ``steps`` steps and CFG (a scale
        range draws one scale per sample for the whole trajectory)."""
        scale = draw_scale(self.guidance_scale if guidance_scale is None else guidance_scale, len(noise), noise.device)
        return ode_sample(lambda x, t: self.predict(x, t, cond, guidance_scale=scale),
                          self.schedule, noise, steps, progress=progress)

    def nfe(self, steps: int, guidance_scale: float | None = None) -> int:
        """Network evaluations per sample for ``steps`` steps (twice with CFG)."""
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        return steps * (1 if not isinstance(scale, tuple) and float(scale) == 1.0 else 2)


class SharedBaseRole(nn.Module):
    """A trained role whose ``denoiser`` may be the teacher's own network with this role's LoRA adapter
    ``lora_adapter`` in it (None: the role owns its network, a copy).

    - ``adapter_selected()``: the context every forward of the role runs in (only its adapter on).
    - ``named_parameters`` / ``parameters`` leave out another role's adapter in the shared network,
      so an algorithm's ``parameters_of(phase)``, the trainer's phase lists, the EMA and the
      gradient clipping see this role's parameters only (the frozen base is listed, as for any
      frozen weight; ``state_dict`` keeps everything, so checkpoints restore the whole network).
    - ``_ddp_params_and_buffers_to_ignore`` (read by torch's ``DistributedDataParallel`` when it
      wraps the role): those other adapters, which the other role's wrapper synchronises.
    """

    lora_adapter: str | None = None
    denoiser: Denoiser

    def adapter_selected(self) -> contextlib.AbstractContextManager[None]:
        """Within the block the shared network runs with this role's adapter alone (no-op for a copy)."""
        if self.lora_adapter is None:
            return contextlib.nullcontext()
        return active_adapter(self.denoiser.backbone, self.lora_adapter)

    def _foreign(self, name: str) -> bool:
        owner = adapter_of(name)
        return self.lora_adapter is not None and owner is not None and owner != self.lora_adapter

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in super().named_parameters(prefix, recurse, remove_duplicate):
            if not self._foreign(name):
                yield name, p

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        return [name for name, _ in super().named_parameters() if self._foreign(name)]


class Generator(SharedBaseRole):
    """A 1..K-step generator: ``forward(x_t, t, cond) -> x0``.

    Args:
        denoiser: initial network; deep-copied unless ``copy=False`` or LoRA is on.
        steps: the default number of sampling steps K.
        t_max: the time the first step starts from (1.0: pure noise; SiD-LSG uses 0.625).
        lora_rank: train LoRA adapters of this rank injected into ``denoiser`` itself (shared with the
            teacher, which runs with them disabled: one copy of the base) instead of a full copy.
        lora_alpha: LoRA scale numerator (scale = alpha / rank; default: the rank).
        lora_target_modules: module names (suffixes) or a regex that receive adapters.
        timesteps: the backbone timesteps of the ``steps``-step grid, descending, starting at ``t_max``'s
            timestep (DMD2's ``denoising_step_list``; e.g. 300, 150, 100, 50); other step counts keep the
            even grid. None: the even grid for every step count.
        training_timesteps: the ``steps``-step grid backward simulation trains on (DMD2 Sec. 4.5, few-step
            SiD), the same rules as ``timesteps``; None: the sampling grid. Sampling and export keep
            ``timesteps``: a network trained on one grid may be sampled on another.
    """

    def __init__(self, denoiser: Denoiser, steps: int = 1, t_max: float = 1.0, copy: bool = True,
                 lora_rank: int | None = None, lora_alpha: float | None = None,
                 lora_target_modules: list[str] | str | None = None,
                 timesteps: list[float] | None = None, training_timesteps: list[float] | None = None) -> None:
        super().__init__()
        if lora_rank:
            if not has_lora(denoiser.backbone, ADAPTER):
                add_lora(denoiser.backbone, lora_rank, lora_alpha, lora_target_modules, adapter=ADAPTER)
            self.denoiser = denoiser
            self.lora_adapter = ADAPTER
        else:
            self.denoiser = _trainable_copy(denoiser) if copy else denoiser
        self.steps = int(steps)
        self.t_max = float(t_max)
        self.timesteps = None if timesteps is None else check_timesteps(self.schedule, timesteps, self.steps,
                                                                        self.t_max)
        self.training_timesteps = None if training_timesteps is None else check_timesteps(
            self.schedule, training_timesteps, self.steps, self.t_max, key="generator.training_timesteps")

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule

    def forward(self, x_t: Tensor, t: Tensor | float, cond: Conditioning) -> Tensor:
        with self.adapter_selected():
            return self.denoiser(x_t, t, cond, out=Prediction.X0)

    def grid(self, steps: int | None = None) -> Tensor:
        """Start times of the K steps: ``timesteps`` for its own K, else evenly spaced from ``t_max``
        (DMD2: 999, 749, 499, 249)."""
        return step_grid(self.schedule, self.steps if steps is None else int(steps), self.t_max, self.timesteps)

    def training_grid(self) -> Tensor:
        """The K-step grid backward simulation trains on: ``training_timesteps``, else ``grid()``."""
        return step_grid(self.schedule, self.steps, self.t_max, self.training_timesteps or self.timesteps)

    def sample(self, noise: Tensor, cond: Conditioning, steps: int | None = None, *,
               generator: torch.Generator | None = None) -> Tensor:
        """x0 after ``steps`` generator steps from ``noise`` [B, ...] (re-noising between steps)."""
        return renoise_sample(lambda x, t: self(x, t, cond), self.schedule, noise, self.grid(steps),
                              generator=generator)

    def settings(self) -> dict:
        """The ``generator`` config node that rebuilds this sampler around a saved student."""
        settings = {"_target_": f"{type(self).__module__}.{type(self).__qualname__}", "steps": self.steps,
                    "t_max": self.t_max}
        return settings if self.timesteps is None else {**settings, "timesteps": list(self.timesteps)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


class ConsistencyGenerator(Generator):
    """A consistency-distilled student (LCM, multistep / segmented CD; ``algorithms.consistency``).

    - Output in LCM's boundary form (Sec. 4.1, after CM Eq. 7): ``c_skip(t) x_t + c_out(t) x0_hat``
      with ``c_skip = sd^2 / ((k T)^2 + sd^2)``, ``c_out = k T / sqrt((k T)^2 + sd^2)`` at the
      backbone timestep T = t (N - 1) (VP) or t N (flow), k = ``timestep_scaling``, sd = ``sigma_data``
      (diffusers' ``LCMScheduler`` uses the same scalings); ``timestep_scaling=None`` returns x0_hat.
    - The K-step grid is picked from the M-point solver grid the way ``LCMScheduler.set_timesteps(K)``
      picks it from ``original_inference_steps = M`` (M = 50, K = 4: 999, 759, 499, 259).
    - ``sampler="renoise"``: LCM's multistep sampling (fresh noise between steps, as LCMScheduler);
      ``"ode"``: multistep CD's deterministic DDIM jumps between segment edges.
    - ``guidance_embedding_dim``: give the student the CFG scale as an input (LCM's w embedding;
      ``stepdistill.denoisers.guidance_embedding``), used at ``guidance_scale`` unless the condition
      carries its own.

    Args:
        denoiser: initial network (the teacher's; deep-copied unless ``copy=False``).
        steps: default number of sampling steps K.
        solver_steps: M, the teacher-solver grid the student is trained on (LCM: 50).
        t_max: where the solver grid and sampling start (1: pure noise, as diffusers' LCMScheduler).
            Below 1 the student takes standard normal noise as the state at ``t_max`` (as DMD2's
            digits students do: an eps network's x0 at timestep 999 amplifies its errors 156x).
    """

    def __init__(self, denoiser: Denoiser, steps: int = 4, solver_steps: int = 50,
                 timestep_scaling: float | None = 10.0, sigma_data: float = 0.5, sampler: str = "renoise",
                 guidance_scale: float = 1.0, guidance_embedding_dim: int | None = None, t_max: float = 1.0,
                 copy: bool = True, lora_rank: int | None = None, lora_alpha: float | None = None,
                 lora_target_modules: list[str] | str | None = None) -> None:
        if lora_rank and guidance_embedding_dim:
            raise ValueError("a LoRA student shares the teacher's network, which cannot take a guidance embedding: "
                             "set generator.guidance_embedding_dim=null (LCM-LoRA trains at one CFG scale)")
        super().__init__(denoiser, steps=steps, t_max=t_max, copy=copy, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         lora_target_modules=lora_target_modules)
        if sampler not in ("renoise", "ode"):
            raise ValueError(f"generator.sampler must be 'renoise' or 'ode', got {sampler!r}")
        if not 1 <= self.steps <= solver_steps:
            raise ValueError(f"generator.steps={steps} must be in 1..generator.solver_steps={solver_steps}")
        self.solver_steps = int(solver_steps)
        self.timestep_scaling = None if timestep_scaling is None else float(timestep_scaling)
        self.sigma_data = float(sigma_data)
        self.sampler = sampler
        self.guidance_scale = float(guidance_scale)
        if guidance_embedding_dim and embedding_dim(self.denoiser.backbone) is None:
            add_guidance_embedding(self.denoiser.backbone, int(guidance_embedding_dim))

    def settings(self) -> dict:
        return {**super().settings(), "solver_steps": self.solver_steps, "timestep_scaling": self.timestep_scaling,
                "sigma_data": self.sigma_data, "sampler": self.sampler, "guidance_scale": self.guidance_scale}

    @property
    def guided(self) -> bool:
        """Whether the network takes the CFG scale as an input."""
        return embedding_dim(self.denoiser.backbone) is not None

    def boundary_scalings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(c_skip, c_out) [B] in float64 at continuous times ``t`` [B]."""
        if self.timestep_scaling is None:
            return torch.zeros_like(t, dtype=torch.float64), torch.ones_like(t, dtype=torch.float64)
        scaled = self.schedule.to_model_time(t).to(t.device) * self.timestep_scaling
        sd2 = self.sigma_data ** 2
        return sd2 / (scaled**2 + sd2), scaled / (scaled**2 + sd2).sqrt()

    def forward(self, x_t: Tensor, t: Tensor | float, cond: Conditioning) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float64)
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        if self.guided and cond.guidance is None:
            cond = cond.with_guidance(self.guidance_scale)
        with self.adapter_selected():
            x0 = self.denoiser(x_t, t, cond, out=Prediction.X0)
        c_skip, c_out = (c.reshape(-1, *([1] * (x_t.dim() - 1))) for c in self.boundary_scalings(t))
        return (c_skip * x_t.double() + c_out * x0.double()).to(x0.dtype)

    def solver_grid(self) -> Tensor:
        """The M + 1 descending solver times from ``t_max``, the last one 0 (VP, M = 50, t_max = 1:
        999, 979, ..., 19, then 0)."""
        return self.schedule.timesteps(self.solver_steps, self.t_max)

    def grid(self, steps: int | None = None) -> Tensor:
        k = self.steps if steps is None else int(steps)
        if not 1 <= k <= self.solver_steps:
            raise ValueError(f"steps must be in 1..{self.solver_steps} (the solver grid), got {k}")
        index = [(i * self.solver_steps) // k for i in range(k)]
        return self.solver_grid()[index]

    def sample(self, noise: Tensor, cond: Conditioning, steps: int | None = None, *,
               generator: torch.Generator | None = None) -> Tensor:
        if self.sampler == "renoise":
            return super().sample(noise, cond, steps, generator=generator)
        grid = torch.cat([self.grid(steps), torch.zeros(1, dtype=torch.float64)])
        return ode_sample(lambda x, t: self(x, t, cond), self.schedule, noise, len(grid) - 1, grid=grid)


class AdapterGenerator(Generator):
    """AGD's student (``algorithms.agd``): the frozen base with guidance adapters
    (``stepdistill.adapters``); one forward per step reproduces the base's CFG at any scale.

    Sampling is the teacher's own ODE sampler (DDIM / Euler, ``steps`` steps from ``t_max``) with one
    network evaluation per step instead of CFG's two. The base network is shared, not copied (the
    teacher runs it with the adapters inactive), and only the adapters train.

    Args:
        denoiser: the base network (the teacher's, or another checkpoint of the same base).
        steps: default sampling steps.
        guidance_scale: default CFG scale s (``u + s (c - u)``) when the condition carries none.
        kind / dim / attn_dim / heads / target_modules: the adapters (``GuidanceAdapters``).
        adapters_path: load trained adapters from this directory instead of fresh ones.
    """

    def __init__(self, denoiser: Denoiser, steps: int = 50, guidance_scale: float = 3.0, t_max: float = 1.0,
                 kind: str = "cross_attention", dim: int = 64, attn_dim: int = 16, heads: int = 1,
                 target_modules: list[str] | str | None = None, adapters_path: str | None = None,
                 copy: bool = False) -> None:
        super().__init__(denoiser, steps=steps, t_max=t_max, copy=copy)
        self.denoiser.requires_grad_(False)
        self.guidance_scale = float(guidance_scale)
        if adapters_path:
            self.adapters = GuidanceAdapters.load(adapters_path, self.denoiser).requires_grad_(True)
        else:
            self.adapters = GuidanceAdapters(self.denoiser, kind, dim, attn_dim, heads, target_modules)

    def settings(self) -> dict:
        s = self.adapters.settings
        return {**super().settings(), "guidance_scale": self.guidance_scale, "kind": s["kind"], "dim": s["dim"],
                "attn_dim": s["attn_dim"], "heads": s["heads"], "target_modules": list(s["targets"])}

    def forward(self, x_t: Tensor, t: Tensor | float, cond: Conditioning, *,
                out: Prediction = Prediction.X0) -> Tensor:
        """The adapted network's prediction in ``out`` at the condition's CFG scale (default
        ``guidance_scale``); inside ``self.adapters.disabled()`` the base model's."""
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float64)
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        if cond.guidance is None:
            cond = cond.with_guidance(self.guidance_scale)
        with self.adapters.active(t, cond.to(x_t.device)):
            return self.denoiser(x_t, t, cond, out=out)

    def sample(self, noise: Tensor, cond: Conditioning, steps: int | None = None, *,
               generator: torch.Generator | None = None, guidance_scale: float | None = None) -> Tensor:
        """The ODE sample (the teacher's DDIM / Euler grid from ``t_max``) with one adapted forward per
        step at ``guidance_scale`` (default: the generator's); ``generator`` is unused (no noise drawn)."""
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        guided = cond.with_guidance(scale) if cond.guidance is None else cond
        grid = torch.cat([self.grid(steps), torch.zeros(1, dtype=torch.float64)])
        return ode_sample(lambda x, t: self(x, t, guided), self.schedule, noise, len(grid) - 1, grid=grid)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.adapters.parameters() if p.requires_grad]


class Critic(SharedBaseRole):
    """The fake-score denoiser (a trainable copy of the teacher's, or LoRA adapters on the teacher's
    own network) with an optional GAN head.

    Args:
        denoiser: initial network (deep-copied unless ``copy=False`` or LoRA is on).
        head: add a ``DiscriminatorHead`` on the denoiser's default features (DMD2's GAN).
        head_width: the head's hidden width (default: the feature width).
        lora_rank: train a LoRA adapter of this rank (``lora.CRITIC_ADAPTER``) injected into
            ``denoiser`` itself instead of a full copy: the base is shared with the teacher (which runs
            with every adapter off) and with a LoRA generator (which runs with its own adapter alone).
        lora_alpha: LoRA scale numerator (scale = alpha / rank; default: the rank).
        lora_target_modules: module names (suffixes) or a regex that receive the critic's adapters.
    """

    def __init__(self, denoiser: Denoiser, head: bool = False, head_width: int | None = None,
                 copy: bool = True, lora_rank: int | None = None, lora_alpha: float | None = None,
                 lora_target_modules: list[str] | str | None = None) -> None:
        super().__init__()
        if lora_rank:
            if not has_lora(denoiser.backbone, CRITIC_ADAPTER):
                add_lora(denoiser.backbone, lora_rank, lora_alpha, lora_target_modules, adapter=CRITIC_ADAPTER,
                         key="critic")
            self.denoiser = denoiser
            self.lora_adapter = CRITIC_ADAPTER
        else:
            self.denoiser = _trainable_copy(denoiser) if copy else denoiser
        self.head = DiscriminatorHead(self.denoiser.feature_shape, head_width) if head else None

    def forward(self, x_t: Tensor, t: Tensor | float, cond: Conditioning, *,
                out: Prediction = Prediction.X0, logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The fake score in ``out``; with ``logits=True`` also the head's logits [B] from the same
        forward (features captured by a hook). Calls go through ``forward`` so DDP syncs them."""
        if not logits:
            with self.adapter_selected():
                return self.denoiser(x_t, t, cond, out=out)
        if self.head is None:
            raise ValueError("this critic has no discriminator head (build it with head=True)")
        name = self.denoiser.default_feature_modules[0]
        captured: list[Tensor] = []
        module = dict(self.denoiser.backbone.named_modules())[name]
        handle = module.register_forward_hook(
            lambda _m, _i, o: captured.append(o[0] if isinstance(o, (tuple, list)) else o))
        try:
            with self.adapter_selected():
                pred = self.denoiser(x_t, t, cond, out=out)
        finally:
            handle.remove()
        return pred, self.head(captured[0])

    def features(self, x_t: Tensor, t: Tensor | float, cond: Conditioning,
                 modules: list[str] | None = None) -> dict[str, Tensor]:
        with self.adapter_selected():
            return self.denoiser.features(x_t, t, cond, modules)


def step_grid(schedule: NoiseSchedule, steps: int, t_max: float = 1.0,
              timesteps: list[float] | None = None) -> Tensor:
    """Start times of a generator's ``steps`` steps: its own backbone ``timesteps`` when they are that
    many, else evenly spaced from ``t_max`` (``NoiseSchedule.timesteps`` without the final 0)."""
    if timesteps is not None and steps == len(timesteps):
        return schedule.from_model_time(torch.tensor(timesteps, dtype=torch.float64))
    return schedule.timesteps(steps, t_max)[:-1]


def check_timesteps(schedule: NoiseSchedule, timesteps: list[float], steps: int, t_max: float,
                    key: str = "generator.timesteps") -> list[float]:
    """``generator.timesteps`` (or the list at config ``key``) as floats, or a one-line ``ValueError``:
    ``steps`` descending backbone timesteps above 0 (VP: integers on the table) whose first is
    ``t_max``'s timestep."""
    values = [float(v) for v in timesteps]
    start = float(schedule.to_model_time(schedule.timesteps(1, t_max)[0]))
    problem = None
    if len(values) != steps:
        problem = f"has {len(values)} values for generator.steps={steps}"
    elif any(b >= a for a, b in zip(values, values[1:], strict=False)) or values[-1] <= 0:
        problem = "must be strictly descending and above 0"
    elif schedule.kind == "vp" and any(v != round(v) for v in values):
        problem = "must be integer timesteps (a VP table)"
    elif abs(values[0] - start) > 1e-6:
        problem = f"starts at {values[0]:g}, but generator.t_max={t_max} starts at timestep {start:g}"
    if problem:
        raise ValueError(f"{key}={values} {problem}: set the list (or t_max) so they agree")
    return values


def _trainable_copy(denoiser: Denoiser) -> Denoiser:
    out = copy.deepcopy(denoiser)
    out.train().requires_grad_(True)
    return out
