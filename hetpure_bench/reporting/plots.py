"""The report's figures (matplotlib, PNG, fixed size), each readable without the text around it."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .published import PublishedResult
from .tables import strongest_rows

SIZE_IN, DPI = (10.0, 6.0), 100  # every figure is 1000 x 600 pixels (the image grid: its own height)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # No software/date metadata: the same data gives the same bytes.
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return path


def config_values(defense_config: str) -> dict[str, str]:
    """``"t_l=200 t_s=100 ..."`` -> {"t_l": "200", "t_s": "100", ...}."""
    return dict(token.split("=", 1) for token in defense_config.split() if "=" in token)


def setup_caption(rows: list[dict]) -> str:
    keys = ("classifier", "diffusion_model", "data_source", "n_images", "seed")
    values = {k: sorted({str(r[k]) for r in rows} - {"-"}) for k in keys}  # "-": no diffusion model
    return "measured: " + ", ".join(f"{k} {'/'.join(v)}" for k, v in values.items())


def place_labels(points: list[tuple[float, float, str]], char_width: float, height: float) -> list[tuple[float, float]]:
    """Label positions (data units) next to each point, trying offsets until a label's box
    overlaps no marker and no earlier label (nearby points' labels would print over each other)."""
    offsets = [(1, 1), (1, -1 - height), (1, 1 + height), (1, -1 - 2 * height), (1, 1 + 2 * height),
               (1, -1 - 3 * height), (1, 1 + 3 * height)]
    boxes = [(x - 0.8, y - 1.2, x + 0.8, y + 1.2) for x, y, _ in points]  # the markers themselves
    placed = []
    for x, y, text in points:
        width = char_width * len(text)
        for dx, dy in offsets:
            box = (x + dx, y + dy, x + dx + width, y + dy + height)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                break
        boxes.append(box)
        placed.append((box[0], box[1]))
    return placed


def error_lengths(rows: list[dict], name: str) -> np.ndarray:
    """Matplotlib's asymmetric error bars (2 x len(rows), percentage points) from the rows'
    ``<name>_ci`` intervals; zero length where a row has none (stored before rows carried them)."""
    lengths = [(r[f"{name}_acc"] - r[f"{name}_ci"][0], r[f"{name}_ci"][1] - r[f"{name}_acc"]) if r.get(f"{name}_ci")
               else (0.0, 0.0) for r in rows]
    return 100 * np.array(lengths, dtype=float).reshape(-1, 2).T


def plotted_mode(rows: list[dict]) -> str | None:
    """The evaluation mode the figures draw one point per defense in: single where rows have it,
    else the expected:K most rows have (a one-shot number's unbiased estimate), else the most
    common mode (ties: the first in sorted order, so a figure does not depend on hashing)."""
    modes = [r["evaluation"] for r in rows]
    if "single" in modes:
        return "single"
    pool = [m for m in modes if m.startswith("expected:")] or modes
    return max(sorted(set(pool)), key=pool.count) if pool else None


def headline_rows(rows: list[dict]) -> list[dict]:
    """One row per defense: among its rows in the plotted mode on the most images (sweeps use
    fewer), the strongest attack's."""
    mode = plotted_mode(rows)
    chosen = [r for r in strongest_rows(rows) if r["evaluation"] == mode]
    most = {}
    for row in chosen:
        most[row["defense"]] = max(most.get(row["defense"], 0), row["n_images"])
    best: dict[str, dict] = {}
    for row in (r for r in chosen if r["n_images"] == most[r["defense"]]):
        if row["defense"] not in best or row["robust_acc"] < best[row["defense"]]["robust_acc"]:
            best[row["defense"]] = row
    return [best[d] for d in sorted(best)]


def scatter_plot(rows: list[dict], published: list[PublishedResult], path: Path) -> Path:
    """Robust vs clean accuracy: measured defenses (strongest attack run, in the plotted mode)
    next to published purification results and adversarial-training references."""
    fig, ax = plt.subplots(figsize=SIZE_IN)
    measured = sorted(headline_rows(rows), key=lambda r: (r["robust_acc"], r["clean_acc"]))
    ordered = [(100 * r["clean_acc"], 100 * r["robust_acc"], r["defense"]) for r in measured]
    if measured:  # 95% intervals over images in both directions, drawn under the markers
        ax.errorbar([p[0] for p in ordered], [p[1] for p in ordered], xerr=error_lengths(measured, "clean"),
                    yerr=error_lengths(measured, "robust"), fmt="none", ecolor="tab:blue", alpha=0.35, lw=1, capsize=2)
    for (x, y, text), (lx, ly) in zip(ordered, place_labels(ordered, 0.62, 2.4)):
        ax.scatter(x, y, marker="o", color="tab:blue", s=40, zorder=3)
        ax.annotate(text, (x, y), xytext=(lx, ly), fontsize=8, va="bottom",
                    arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5})
    handles = [plt.Line2D([], [], marker="o", color="tab:blue", linestyle="",
                          label=f"measured here: one per defense, strongest attack run, {plotted_mode(rows) or 'no'} "
                                "evaluation; bars: 95% intervals over images")]
    # Published points are told apart in the legend, not by labels (they cluster).
    # Entries without a clean accuracy (robust-only re-evaluations) have no point here.
    colors = {"purification": plt.cm.Reds(np.linspace(0.45, 0.95, 4)),
              "purification-other": plt.cm.Oranges(np.linspace(0.45, 0.95, 4)),
              "reference": plt.cm.Greys(np.linspace(0.35, 0.85, 4))}
    styles = {"purification": ("*", 14, "published"), "purification-other": ("^", 9, "published (other purifier)"),
              "reference": ("s", 8, "AT reference")}
    counters = dict.fromkeys(colors, 0)
    for entry in (p for p in published if p.clean is not None):
        color = colors[entry.kind][counters[entry.kind] % 4]
        counters[entry.kind] += 1
        marker, size, kind = styles[entry.kind]
        ax.plot(entry.clean, entry.robust, marker=marker, color=color, markersize=size, linestyle="")
        handles.append(plt.Line2D([], [], marker=marker, color=color, markersize=size * 0.8, linestyle="",
                                  label=f"{kind}: {entry.method}, {entry.classifier} ({entry.clean:g} / {entry.robust:g})"))
    ax.legend(handles=handles, loc="upper left", fontsize=7, title="clean / robust %, published setups: "
              "official CIFAR-10, AutoAttack", title_fontsize=7)
    ax.set(xlabel="clean accuracy (%)", ylabel="robust accuracy (%)", xlim=(0, 100), ylim=(0, 100),
           title="Robust vs clean accuracy, CIFAR-10 Linf 8/255 (measured and published setups differ)")
    ax.grid(alpha=0.3)
    fig.text(0.01, 0.01, setup_caption(measured) if measured else "no measured rows", fontsize=7)
    return _save(fig, path)


SWEEP_AXES = {"diffpure": ("t_star", None), "hetpure": ("t_l", "t_s")}


def sweep_groups(rows: list[dict], defense: str) -> list[dict]:
    """Rows of ``defense`` (single evaluation) whose swept setting varies within one measured setup:
    the largest such group."""
    x_key = SWEEP_AXES[defense][0]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["defense"] != defense or row["evaluation"] != "single":
            continue
        key = tuple(row[k] for k in ("classifier", "diffusion_model", "data_source", "threat", "eps", "attack",
                                     "gradient_mode", "n_images", "seed"))
        groups.setdefault(key, []).append(row)
    varied = [g for g in groups.values() if len({config_values(r["defense_config"]).get(x_key) for r in g}) >= 3]
    return max(varied, key=len) if varied else []


def strength_plot(rows: list[dict], path: Path) -> Path:
    """Clean and robust accuracy vs diffusion strength: DiffPure's t* and hetpure's (t_l, t_s)."""
    fig, axes = plt.subplots(1, 2, figsize=SIZE_IN, sharey=True)
    captions = []
    for ax, defense in zip(axes, SWEEP_AXES):
        x_key, line_key = SWEEP_AXES[defense]
        group = sweep_groups(rows, defense)
        if not group:
            ax.text(0.5, 0.5, f"no {defense} sweep in the store", ha="center", transform=ax.transAxes)
        by_line: dict[str, list[dict]] = {}
        for row in group:
            by_line.setdefault(config_values(row["defense_config"]).get(line_key, "") if line_key else "", []).append(row)
        x_of = lambda r: float(config_values(r["defense_config"])[x_key])  # noqa: E731 - x_key of this panel
        width = np.ptp([x_of(r) for r in group]) if group else 0.0
        for k, (line, members) in enumerate(sorted(by_line.items(), key=lambda item: float(item[0] or 0))):
            members = sorted(members, key=x_of)
            x = np.array([x_of(r) for r in members])
            color = plt.cm.viridis(k / max(1, len(by_line) - 1) * 0.85)
            label = f"{line_key} = {line}" if line_key else defense
            for j, (name, style) in enumerate((("clean", "o--"), ("robust", "s-"))):
                # Each line is shifted apart a little so that the intervals do not hide each other.
                shift = width * 0.015 * (2 * k + j - (2 * len(by_line) - 1) / 2)
                ax.errorbar(x + shift, [100 * r[f"{name}_acc"] for r in members], yerr=error_lengths(members, name),
                            fmt=style, color=color, capsize=2, elinewidth=0.8, label=f"{name}, {label}")
        if group:
            captions.append(f"{defense}: {group[0]['attack']}, gradient {group[0]['gradient_mode']}, {group[0]['n_images']} images")
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)  # below: the data fill the panel
        ax.set(xlabel=f"{x_key} ({'continuous time' if x_key == 't_star' else 'diffusion step'})",
               title=f"{defense}: accuracy vs diffusion strength", ylim=(0, 100))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%), single evaluation")
    setup = setup_caption(sum((sweep_groups(rows, d) for d in SWEEP_AXES), [])) if rows else ""
    fig.text(0.01, 0.01, "bars: 95% intervals over images (lines shifted apart slightly along x)\n"
             + " | ".join(captions) + "\n" + setup, fontsize=7)
    fig.tight_layout(rect=(0, 0.075, 1, 1))
    return _save(fig, path)


def configured_attack(label: str) -> str:
    """An attack label with the suite members a defense skipped (attacks.attack_label's
    "; skipped, not applicable: ...") put back after the ones it ran: the attack the preset
    configured for every defense (exact when the skipped members come last, as DiffAttack does)."""
    return re.sub(r"; skipped, not applicable: (.*)\)$", r" + \1)", label)


def cost_rows(rows: list[dict]) -> list[dict]:
    """Per defense one full-gradient row in the plotted mode under the attack the most defenses
    ran (the same attack for every defense drawn; ties: the first name in sorted order), on
    the most images (not a sweep's), then the fastest."""
    mode = plotted_mode(rows)
    by_attack: dict[str, list[dict]] = {}
    for r in rows:
        if r["evaluation"] == mode and r["gradient_mode"] == "full" and "mask-aware" not in r["attack"]:
            by_attack.setdefault(configured_attack(r["attack"]), []).append(r)
    attack = max(sorted(by_attack), key=lambda a: len({r["defense"] for r in by_attack[a]}), default=None)
    rank = lambda r: (-r["n_images"], r["wall_s"] / r["n_images"])  # noqa: E731 - most images (not a sweep's), then fastest
    chosen: dict[str, dict] = {}
    for row in by_attack.get(attack, []):
        if row["defense"] not in chosen or rank(row) < rank(chosen[row["defense"]]):
            chosen[row["defense"]] = row
    return list(chosen.values())


def cost_plot(rows: list[dict], path: Path) -> Path:
    """NFE, seconds per image and peak memory per defense, from cost_rows (one attack for all)."""
    chosen = {r["defense"]: r for r in cost_rows(rows)}
    attack = configured_attack(next(iter(chosen.values()))["attack"]) if chosen else None
    names = sorted(chosen, key=lambda d: chosen[d]["wall_s"] / chosen[d]["n_images"])
    skipped = " (members not applicable to a defense skipped)" if any(r["attack"] != attack for r in chosen.values()) else ""
    fig, axes = plt.subplots(1, 3, figsize=SIZE_IN, sharey=True)
    metrics = [
        ("nfe", "network calls\nper purification (NFE)", lambda r: r["nfe"]),
        ("time", "seconds per image\n(attack + evaluation)", lambda r: r["wall_s"] / r["n_images"]),
        ("memory", "peak memory, MiB\n(process RSS on CPU: includes\nevery network loaded)", lambda r: r["peak_mem_mib"]),
    ]
    for ax, (_, label, value) in zip(axes, metrics):
        values = [value(chosen[d]) for d in names]
        ax.barh(names, values, color="tab:blue")
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.3g}" if v < 100 else f" {v:.0f}", va="center", fontsize=7)
        ax.set(xlabel=label)
        ax.grid(axis="x", alpha=0.3)
    devices = sorted({chosen[d]["device"] for d in names})
    fig.suptitle(textwrap.fill(f"Cost per defense under {attack or 'no attack'}{skipped}, full gradients, on {', '.join(devices) or 'no device'}",
                               150), fontsize=9)  # a suite's name is long
    fig.text(0.01, 0.01, setup_caption(list(chosen.values())) if chosen else "no rows", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    return _save(fig, path)


def convergence_lines(rows: list[dict]) -> list[tuple[str, list[float], bool]]:
    """One line per attack with a history, once per setup (its evaluation modes' rows share the
    attack): the label, robust accuracy (%) of the attack's own check per model pass, and
    whether it converged."""
    lines, seen = [], set()
    for row in rows:
        if row.get("setup_hash") in seen or not row.get("convergence"):
            continue
        seen.add(row.get("setup_hash"))
        for entry in row["convergence"]:
            label = f"{row['defense']} [{row['gradient_mode']}]: {entry['attack']}" + ("" if entry["converged"] else " NOT converged")
            lines.append((label, [100 * c / row["n_images"] for c in entry["robust_counts"]], entry["converged"]))
    return lines


def convergence_plot(rows: list[dict], path: Path) -> Path:
    """Robust accuracy of each attack's own check vs model pass, one line per attack with a
    history (dashed: not converged), for judging whether more iterations would have helped."""
    fig, ax = plt.subplots(figsize=SIZE_IN)
    fig.subplots_adjust(left=0.07, right=0.56, top=0.93, bottom=0.18)  # the legend right of the axes
    lines = convergence_lines(rows)
    for k, (label, values, done) in enumerate(lines):
        ax.plot(range(len(values)), values, "-" if done else "--", color=plt.cm.tab10(k % 10), lw=1.4, label=label)
    if lines:
        ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    else:
        ax.text(0.5, 0.5, "no row with an attack history in the store", ha="center", transform=ax.transAxes)
    ax.set(xlabel="model pass (each restart's start point, then its iterations; restarts one after the other)",
           ylabel="robust accuracy (%), the attack's own check", ylim=(0, 100),
           title="Convergence: each attack's own robust check per iteration")
    ax.grid(alpha=0.3)
    used = [r for r in rows if r.get("convergence")]
    fig.text(0.01, 0.01, "own check: more than half of the best iterate's EOT copies classified correctly (evidence, "
             "not the result: rows report the runner's evaluation)\nconverged (solid): the robust count moved by at "
             "most one image over the last 25% of passes; dashed: not converged\n"
             + (setup_caption(used) if used else ""), fontsize=7)
    return _save(fig, path)


def image_grid_plot(panels: dict[str, list[dict]], path: Path, caption: str = "") -> Path:
    """One block of rows per defense, one row per image; columns are that defense's stages
    (clean, adversarial, mask overlay, noised, purified), each titled with its predicted label;
    ``caption`` (the setup the images come from) above them."""
    lines = [(defense, image) for defense, images in panels.items() for image in images]
    columns = max((len(image["stages"]) for _, image in lines), default=1)
    caption_in = 0.15 * (caption.count("\n") + 1) + 0.1 if caption else 0.0  # a band of its own above the panels
    height = 1.75 * max(1, len(lines)) + caption_in
    fig, axes = plt.subplots(len(lines) or 1, columns, figsize=(1.6 * columns, height), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (defense, image) in enumerate(lines):
        for c, stage in enumerate(image["stages"]):
            ax = axes[r, c]
            ax.imshow(stage["image"], interpolation="nearest")
            if stage.get("overlay") is not None:
                ax.imshow(stage["overlay"], cmap="Reds", alpha=0.45, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(stage["title"], fontsize=7)
        axes[r, 0].text(-0.15, 0.5, f"{defense}\ntrue: {image['label']}", transform=axes[r, 0].transAxes,
                        ha="right", va="center", fontsize=7)
    if caption:
        fig.suptitle(caption, fontsize=7, y=1 - 0.05 / height, va="top")
    fig.tight_layout(rect=(0, 0, 1, 1 - caption_in / height))
    return _save(fig, path)


def staircase_plot(defense: str, steps: list[tuple[str, dict]], path: Path) -> Path:
    """Robust accuracy per protocol step (x) with 95% error bars, one line per evaluation mode
    (``steps``: (label, mode -> Interval or None)); pending steps are left out of their line."""
    fig, ax = plt.subplots(figsize=SIZE_IN)
    modes = list(steps[0][1]) if steps else []
    drawn = False
    for k, mode in enumerate(modes):
        points = [(i, s[1][mode]) for i, s in enumerate(steps) if s[1][mode] is not None]
        if not points:
            continue
        drawn = True
        xs = np.array([i for i, _ in points]) + (k - (len(modes) - 1) / 2) * 0.06  # modes side by side
        ys = np.array([100 * p.value for _, p in points])
        errors = np.array([[100 * (p.value - p.low) for _, p in points], [100 * (p.high - p.value) for _, p in points]])
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=4, color=plt.cm.tab10(k), label=mode)
    ax.set_xticks(range(len(steps)), [label for label, _ in steps])
    ax.set(xlabel="protocol step: (a) authors' surrogate PGD-EOT, (b) full-gradient PGD-EOT, (c) APGD-EOT margin, "
           "(d) the suite (+ mask attacks)", ylabel="robust accuracy (%), 95% interval", ylim=(0, 100),
           title=f"Protocol inflation: {defense}, one choice changed per step")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(title="evaluation")
    else:
        ax.text(0.5, 0.5, "no step in the result store yet", ha="center", transform=ax.transAxes)
    return _save(fig, path)
