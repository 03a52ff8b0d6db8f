"""Interactive explorers for the notebooks; each redraw is a plain function, testable headless."""

from __future__ import annotations

import io
from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch

from minisd.plotting import plot_schedules, show_images, show_row
from minisd.schedule import SCHEDULE_KINDS, NoiseSchedule

# Fractions of the way through the schedule at which the explorer shows noised images.
ROW_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class ExplorerState:
    """What the schedule explorer shows for one setting of its controls."""

    kind: str
    num_timesteps: int
    t: int
    alpha_bar: float  # signal variance left at t
    snr: float
    row_timesteps: tuple[int, ...]
    error: str | None = None


def noised_row(
    schedule: NoiseSchedule, x0: torch.Tensor, timesteps: list[int], seed: int = 0
) -> torch.Tensor:
    """x0 (1, C, H, W) noised to each timestep with one noise draw: (len(timesteps), C, H, W)."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor(timesteps)
    return schedule.add_noise(
        x0.expand(len(t), *x0.shape[1:]), noise.expand(len(t), *x0.shape[1:]), t
    )


def draw_schedule_explorer(
    kind: str,
    num_timesteps: int,
    beta_start: float | None,
    beta_end: float | None,
    t: int,
    x0: torch.Tensor,
    fig: plt.Figure | None = None,
) -> tuple[plt.Figure, ExplorerState]:
    """Draw the schedule's curves (marked at t) and x0 noised along it; return figure, state."""
    fig = fig or plt.figure(figsize=(12, 5))
    fig.clear()
    if kind == "cosine":
        beta_start = beta_end = None
    try:
        sched = NoiseSchedule(kind, num_timesteps, beta_start, beta_end)
    except ValueError as err:
        fig.text(0.5, 0.5, f"invalid settings: {err}", ha="center", wrap=True)
        return fig, ExplorerState(kind, num_timesteps, t, float("nan"), float("nan"), (), str(err))
    t = min(max(int(t), 0), num_timesteps - 1)
    top, bottom = fig.add_gridspec(2, 1, height_ratios=(1.2, 1))
    curve_axes = top.subgridspec(1, 3).subplots()
    plot_schedules({kind: sched}, axes=curve_axes, mark_t=t)
    row_t = sorted({round(f * (num_timesteps - 1)) for f in ROW_FRACTIONS} | {t})
    images = noised_row(sched, x0[:1], row_t)
    labels = [f"t={s}" + (" *" if s == t else "") for s in row_t]
    show_row(images, labels, axes=bottom.subgridspec(1, len(row_t)).subplots())
    alpha_bar = float(sched.alphas_cumprod[t])
    fig.suptitle(f"{kind}, T={num_timesteps}: at t={t}, alpha-bar={alpha_bar:.4f}")
    fig.tight_layout()
    return fig, ExplorerState(kind, num_timesteps, t, alpha_bar, float(sched.snr(t)), tuple(row_t))


class _Explorer:
    """What every explorer shares: its figure shown as PNG bytes in `self.image` (widget state,
    not cell output), and `self.widget` displayed when the explorer is the cell's value."""

    image: object
    widget: object

    def _arrange(self, controls: list) -> None:
        """Controls first, at their full width; the figure beside them when the notebook is wide
        enough, else wrapped below, and scaled down to the notebook's width when it is narrower.
        A plain HBox lets a wide figure squeeze the controls to nothing (issue 18)."""
        import ipywidgets as w

        self.image.layout = w.Layout(max_width="100%", height="auto", flex="0 1 auto", margin="0")
        panel = w.VBox(controls, layout=w.Layout(flex="0 0 auto", margin="0 12px 8px 0"))
        self.widget = w.Box(
            [panel, self.image], layout=w.Layout(flex_flow="row wrap", align_items="flex-start")
        )

    def _show(self, fig: plt.Figure) -> None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=72)
        self.image.value = buffer.getvalue()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


class ScheduleExplorer(_Explorer):
    """ipywidgets controls (kind, T, beta range, t) that redraw `draw_schedule_explorer`."""

    def __init__(self, x0: torch.Tensor) -> None:
        import ipywidgets as w

        self.x0 = x0
        style = {"description_width": "80px"}
        self.kind = w.Dropdown(
            options=SCHEDULE_KINDS, value="linear", description="schedule", style=style
        )
        self.num_timesteps = w.IntSlider(
            1000, min=10, max=2000, step=10, description="T", style=style
        )
        self.beta_start = w.FloatLogSlider(
            1e-4, base=10, min=-5, max=-1, description="beta_start", style=style
        )
        self.beta_end = w.FloatLogSlider(
            0.02, base=10, min=-3, max=-0.3, description="beta_end", style=style
        )
        self.t = w.IntSlider(250, min=0, max=999, description="t", style=style)
        self.image = w.Image(format="png")  # the figure as PNG bytes: widget state, not output
        self.state: ExplorerState | None = None
        for control in (self.kind, self.num_timesteps, self.beta_start, self.beta_end, self.t):
            control.observe(self._on_change, names="value")
        self._arrange([self.kind, self.num_timesteps, self.beta_start, self.beta_end, self.t])
        self._fig = plt.figure(figsize=(11, 4.5))
        plt.close(self._fig)  # shown through self.image, never by the notebook's own display
        self.update()

    def _on_change(self, change) -> None:
        if change["owner"] is self.num_timesteps:
            self.t.max = self.num_timesteps.value - 1
        self.beta_start.disabled = self.beta_end.disabled = self.kind.value == "cosine"
        self.update()

    def update(self) -> ExplorerState:
        """Redraw for the current control values and return what is shown."""
        self._fig, self.state = draw_schedule_explorer(
            self.kind.value,
            self.num_timesteps.value,
            self.beta_start.value,
            self.beta_end.value,
            self.t.value,
            self.x0,
            fig=self._fig,
        )
        self._show(self._fig)
        return self.state


# ----- notebook 05: prompt, guidance scale, sampler, steps, seed --------------------------------
GUIDANCE_SAMPLERS = ("dpm++2m", "ddim")  # the few-step samplers; DDPM needs all T steps


@dataclass(frozen=True)
class GuidanceState:
    """What the guidance explorer drew for one setting of its controls."""

    prompt: str
    scale: float
    sampler: str
    steps: int
    seed: int
    images: torch.Tensor | None  # (n, C, H, W) in [-1, 1], None if the settings were refused
    error: str | None = None


def draw_guidance_explorer(
    model,
    prompt: str,
    scale: float,
    sampler: str,
    steps: int,
    seed: int,
    n: int = 8,
    fig: plt.Figure | None = None,
) -> tuple[plt.Figure, GuidanceState]:
    """Draw n samples of `model` for `prompt` at guidance `scale`; return the figure and state.
    Bad settings (an unknown sampler, a negative scale, ...) are shown as a message."""
    from minisd.evaluation import generate

    fig = fig or plt.figure(figsize=(8, 1.6))
    fig.clear()
    try:
        config = model.sampler_config(sampler, int(steps))
        images = generate(model, n, config, int(seed), cond=prompt, guidance_scale=scale)
    except (ValueError, TypeError) as err:
        fig.text(0.5, 0.5, f"invalid settings: {err}", ha="center", va="center", wrap=True)
        return fig, GuidanceState(prompt, scale, sampler, steps, seed, None, str(err))
    show_images(images, nrow=n, ax=fig.add_subplot(1, 1, 1))
    fig.suptitle(f"{prompt!r}: guidance scale {scale:g}, {config.name}, seed {seed}", fontsize=10)
    return fig, GuidanceState(prompt, scale, sampler, int(steps), int(seed), images)


class GuidanceExplorer(_Explorer):
    """ipywidgets controls (prompt, guidance scale, sampler, steps, seed) above a grid of
    samples that `draw_guidance_explorer` redraws when a value changes (the prompt on Enter)."""

    def __init__(self, model, prompt: str = "a handwritten seven", n: int = 8) -> None:
        import ipywidgets as w

        self.model, self.n = model, n
        style, wide = {"description_width": "90px"}, w.Layout(width="420px")
        self.prompt = w.Text(prompt, description="prompt", style=style, layout=wide,
                             continuous_update=False)  # fmt: skip
        self.scale = w.FloatSlider(3.0, min=0.0, max=10.0, step=0.5, description="guidance",
                                   style=style, layout=wide)  # fmt: skip
        self.sampler = w.Dropdown(options=GUIDANCE_SAMPLERS, value="dpm++2m",
                                  description="sampler", style=style)  # fmt: skip
        self.steps = w.IntSlider(20, min=2, max=50, description="steps", style=style, layout=wide)
        self.seed = w.IntText(0, description="seed", style=style)
        self.image = w.Image(format="png")
        self.state: GuidanceState | None = None
        controls = [self.prompt, self.scale, self.sampler, self.steps, self.seed]
        for control in controls:
            control.observe(lambda _: self.update(), names="value")
        self._arrange(controls)
        self._fig = plt.figure(figsize=(8, 1.6))
        plt.close(self._fig)
        self.update()

    def update(self) -> GuidanceState:
        """Redraw for the current control values and return what is shown."""
        self._fig, self.state = draw_guidance_explorer(
            self.model, self.prompt.value, self.scale.value, self.sampler.value,
            self.steps.value, self.seed.value, self.n, fig=self._fig,
        )  # fmt: skip
        self._show(self._fig)
        return self.state


# ----- notebook 06: image-to-image --------------------------------------------------------------
@dataclass
class Img2ImgState:
    """What the image-to-image explorer drew for one setting of its controls."""

    prompt: str
    strength: float
    scale: float
    seed: int
    images: torch.Tensor | None  # (n, C, H, W) results in [-1, 1], None if refused
    error: str | None = None


def draw_img2img_explorer(
    model, inputs: torch.Tensor, prompt: str, strength: float, scale: float, seed: int,
    steps: int = 20, fig: plt.Figure | None = None,
) -> tuple[plt.Figure, Img2ImgState]:  # fmt: skip
    """The inputs (top row) redrawn under `prompt` at `strength` (bottom row), DPM-Solver++(2M).
    Bad settings (a strength outside (0, 1], a negative scale) are shown as a message."""
    from minisd.img2img import image_to_image

    fig = fig or plt.figure(figsize=(8, 2.4))
    fig.clear()
    try:
        config = model.sampler_config("dpm++2m", int(steps))
        out = image_to_image(model, inputs, prompt, strength, config, guidance_scale=scale,
                             seed=int(seed))  # fmt: skip
    except (ValueError, TypeError) as err:
        fig.text(0.5, 0.5, f"invalid settings: {err}", ha="center", va="center", wrap=True)
        return fig, Img2ImgState(prompt, strength, scale, seed, None, str(err))
    show_images(torch.cat([inputs, out]), nrow=len(inputs), ax=fig.add_subplot(1, 1, 1))
    fig.suptitle(f"top: inputs; bottom: {prompt!r} at strength {strength:g}, guidance "
                 f"{scale:g}, seed {seed}", fontsize=10)  # fmt: skip
    return fig, Img2ImgState(prompt, strength, scale, int(seed), out)


class Img2ImgExplorer(_Explorer):
    """ipywidgets controls (prompt, strength, guidance scale, seed) above the inputs and their
    redrawn versions; `draw_img2img_explorer` redraws when a value changes."""

    def __init__(self, model, inputs: torch.Tensor, prompt: str = "a handwritten seven") -> None:
        import ipywidgets as w

        self.model, self.inputs = model, inputs
        style, wide = {"description_width": "90px"}, w.Layout(width="420px")
        self.prompt = w.Text(prompt, description="prompt", style=style, layout=wide,
                             continuous_update=False)  # fmt: skip
        self.strength = w.FloatSlider(0.5, min=0.05, max=1.0, step=0.05, description="strength",
                                      style=style, layout=wide)  # fmt: skip
        self.scale = w.FloatSlider(3.0, min=0.0, max=10.0, step=0.5, description="guidance",
                                   style=style, layout=wide)  # fmt: skip
        self.seed = w.IntText(0, description="seed", style=style)
        self.image = w.Image(format="png")
        self.state: Img2ImgState | None = None
        controls = [self.prompt, self.strength, self.scale, self.seed]
        for control in controls:
            control.observe(lambda _: self.update(), names="value")
        self._arrange(controls)
        self._fig = plt.figure(figsize=(8, 2.4))
        plt.close(self._fig)
        self.update()

    def update(self) -> Img2ImgState:
        """Redraw for the current control values and return what is shown."""
        self._fig, self.state = draw_img2img_explorer(
            self.model, self.inputs, self.prompt.value, self.strength.value, self.scale.value,
            self.seed.value, fig=self._fig,
        )  # fmt: skip
        self._show(self._fig)
        return self.state
