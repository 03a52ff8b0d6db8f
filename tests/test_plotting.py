"""Plotting helpers and the schedule explorer, exercised headless (no browser, Agg backend)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from minisd.plotting import image_grid, plot_schedules, show_images  # noqa: E402
from minisd.schedule import SCHEDULE_KINDS, NoiseSchedule  # noqa: E402
from minisd.widgets import ScheduleExplorer, draw_schedule_explorer, noised_row  # noqa: E402


def digit():
    x = -torch.ones(1, 1, 28, 28)
    x[:, :, 6:22, 12:16] = 1.0  # a "1"
    return x


def test_image_grid_maps_range_and_tiles():
    imgs = torch.stack([torch.full((1, 4, 4), -1.0), torch.full((1, 4, 4), 1.0)])
    grid = image_grid(imgs, nrow=2, padding=1)
    assert grid.shape == (6, 11)
    assert grid[1, 1] == 0.0 and grid[1, 6] == 1.0
    rgb = image_grid(torch.zeros(3, 3, 4, 4), nrow=3)
    assert rgb.shape[-1] == 3 and np.allclose(rgb[2, 2], 0.5)
    with pytest.raises(ValueError, match=r"\(B, 1 or 3, H, W\)"):
        image_grid(torch.zeros(2, 2, 4, 4))


def test_show_images_and_plot_schedules_draw():
    ax = show_images(torch.zeros(5, 1, 8, 8), nrow=5, title="x")
    assert ax.get_title() == "x"
    axes = plot_schedules({k: NoiseSchedule(k, 100) for k in SCHEDULE_KINDS}, mark_t=10)
    assert len(axes) == 3 and len(axes[1].lines) == 4 + 1  # four schedules and the t marker
    plt.close("all")


def test_noised_row_shares_noise_and_goes_from_image_to_noise():
    sched = NoiseSchedule("linear", 1000)
    row = noised_row(sched, digit(), [0, 999])
    assert row.shape == (2, 1, 28, 28)
    assert torch.corrcoef(torch.stack([row[0].flatten(), digit().flatten()]))[0, 1] > 0.99
    assert abs(row[1].std().item() - 1) < 0.1


def test_draw_schedule_explorer_reports_the_point_drawn():
    fig, state = draw_schedule_explorer("scaled_linear", 1000, 0.00085, 0.012, 999, digit())
    assert state.error is None and state.t == 999
    assert state.alpha_bar == pytest.approx(0.0047, abs=1e-4)
    assert state.row_timesteps[0] == 0 and state.row_timesteps[-1] == 999
    assert len(fig.axes) == 3 + len(state.row_timesteps)
    _, state = draw_schedule_explorer("linear", 100, 1e-4, 0.02, 500, digit(), fig=fig)
    assert state.t == 99  # t is clamped into the schedule
    _, state = draw_schedule_explorer("linear", 100, 0.5, 2.0, 5, digit(), fig=fig)
    assert state.error and "(0, 1)" in state.error
    plt.close("all")


def test_schedule_explorer_widget_redraws_on_change():
    ex = ScheduleExplorer(digit())
    assert ex.state.kind == "linear" and ex.state.t == 250
    assert ex.image.value[:8] == b"\x89PNG\r\n\x1a\n"
    first_png = ex.image.value
    ex.kind.value = "cosine"
    assert ex.state.kind == "cosine" and ex.beta_start.disabled
    ex.num_timesteps.value = 100
    assert ex.t.max == 99 and ex.state.num_timesteps == 100
    ex.t.value = 50
    assert ex.state.t == 50 and ex.image.value != first_png
    assert ex.state.alpha_bar == pytest.approx(
        NoiseSchedule("cosine", 100).alphas_cumprod[50].item()
    )
    plt.close("all")


def test_the_system_diagram_highlights_each_lessons_parts():
    from minisd.plotting import LESSON_PARTS, SYSTEM_BOXES, system_diagram

    keys = {key for key, *_ in SYSTEM_BOXES}
    fig, ax = plt.subplots()
    assert system_diagram("03", ax=ax) == LESSON_PARTS["03"]
    drawn = [t.get_text() for t in ax.texts]
    assert all(label in drawn for _, label, *_ in SYSTEM_BOXES)  # every box, lit or not
    assert "encoder" in LESSON_PARTS["03"] and "decoder" in LESSON_PARTS["03"]
    assert set(LESSON_PARTS["06"]) == keys  # lesson 06 runs the whole system
    assert all(set(parts) <= keys for parts in LESSON_PARTS.values())
    plt.close(fig)
    with pytest.raises(ValueError, match="choose one of 01"):
        system_diagram("07")
