"""The Spot inspector dock: the composition of the spot under the mouse (click, or hover) as a bar chart, with
the method's scores, and each type's 90% interval when the run has one."""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget

from ... import keys
from ..lifetime import DockLinks
from ..scrolling import VerticalScroll
from ..session import ResultRecord, session_for
from ..views import nearest_spot


class InspectorDock(QWidget):
    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.follow_hover = True
        self.current: tuple[str, int] | None = None
        self.figure = Figure(figsize=(3.2, 2.4), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(170)
        self.canvas.setVisible(False)  # an empty white box until a spot is shown
        self.text = QLabel("click or hover a spot")
        self.text.setWordWrap(True)
        # the chart and the spot's lines scroll when the dock is shorter than them (an interval per type makes
        # the text longer than the space a column of docks leaves it)
        self.body = QWidget()
        body = QVBoxLayout(self.body)
        body.setContentsMargins(4, 4, 4, 4)
        body.addWidget(self.canvas)
        body.addWidget(self.text)
        body.addStretch(1)
        self.scroll = VerticalScroll(self.body)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.scroll)
        self.shown: dict[str, float] = {}
        self.intervals: dict[str, tuple[float, float]] = {}  # the shown spot's 90% interval per type
        self.links = DockLinks(self, napari_viewer)  # undone when the dock closes: a closed inspector stops reacting
        self.links.connect(self.session.spot_picked, self._on_picked)
        self.links.mouse(drag=self._on_click, move=self._on_hover)

    # -- the mouse picks a spot of the active result ------------------------------------------------------
    def spot_at(self, position) -> tuple[ResultRecord, int] | None:
        rec = self.session.active_result()
        if rec is None:
            return None
        idx = nearest_spot(rec.tree, position, max_dist=rec.size * 0.6)
        return None if idx is None else (rec, idx)

    def inspect_at(self, position) -> int | None:
        hit = self.spot_at(position)
        if hit is not None:
            self.session.pick_spot(hit[0].name, hit[1])
        return None if hit is None else hit[1]

    def _on_click(self, _viewer, event):
        if event.type == "mouse_press" and self.session.results:
            self.inspect_at(event.position)

    def _on_hover(self, _viewer, event):
        if not self.session.results or not self.follow_hover:
            return
        hit = self.spot_at(event.position)
        if hit is not None and (hit[0].name, hit[1]) != self.session.spot:
            self.session.pick_spot(hit[0].name, hit[1])

    def _on_picked(self, name: str, idx: int):
        rec = self.session.result(name)
        if rec is not None:
            self.show_spot(rec, idx)

    # -- drawing ------------------------------------------------------------------------------------------
    def show_spot(self, rec: ResultRecord, idx: int):
        self.current = (rec.name, idx)
        row = rec.proportions.iloc[idx]
        barcode = str(rec.adata.obs_names[idx])
        interval = None
        if rec.interval is not None:
            interval = (rec.interval[0].iloc[idx], rec.interval[1].iloc[idx])
        self.figure.clear()
        ax = self.figure.add_subplot(111)
        if row.isna().any():
            self.shown = {}
            ax.text(0.5, 0.5, "filtered: not fitted", ha="center", va="center")
            ax.set_axis_off()
        else:
            nz = row[row > 1e-3].sort_values()
            self.shown = {str(k): float(v) for k, v in nz.items()}
            xerr = None
            if interval is not None:  # the 90% interval as an error bar around each bar
                lo, hi = interval[0].loc[nz.index].to_numpy(), interval[1].loc[nz.index].to_numpy()
                xerr = np.vstack([np.clip(nz.to_numpy() - lo, 0, None), np.clip(hi - nz.to_numpy(), 0, None)])
            ax.barh(list(nz.index), nz.to_numpy(), color=[rec.palette[t] for t in nz.index], xerr=xerr, capsize=2)
            ax.set_xlim(0, 1)
            ax.set_xlabel("proportion")
            ax.tick_params(labelsize=8)
        ax.set_title(barcode, fontsize=9)
        self.canvas.setVisible(True)
        self.canvas.draw_idle()
        obs = rec.adata.obs.iloc[idx]
        score_columns = [c for c in obs.index if c.startswith(f"{rec.key}_") and c != keys.dominant_type(rec.key)]
        score_columns += [c for c in (keys.NUMI,) if c in obs.index]
        parts = [f"<b>{barcode}</b> ({rec.name})", f"dominant: {rec.dominant[idx]}"]
        parts += [f"{k.removeprefix(rec.key + '_')}: {_fmt(obs[k])}" for k in score_columns]
        self.intervals = {}
        if interval is not None and not row.isna().any():
            self.intervals = {str(t): (float(interval[0][t]), float(interval[1][t])) for t in rec.cell_types}
            parts.append("90% intervals:")
            parts += [
                f"{t}: {row[t]:.2f} [{lo:.2f}, {hi:.2f}]"
                for t, (lo, hi) in sorted(self.intervals.items(), key=lambda kv: -row[kv[0]])
            ]
        self.text.setText("<br>".join(parts))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v)
