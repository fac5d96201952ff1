"""`catdog-cache backbones`: the frozen networks available here."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from ..errors import CatdogError
from ..files import printable
from .common import (
    JSON,
    app,
    guarded,
    out,
    to_json,
)


@app.command("backbones")
@guarded
def backbones_cmd(as_json: bool = JSON) -> None:
    """What can be extracted here: feature size, GFLOPs per image, and whether ImageNet weights are offline."""
    from ..backbone import get_backbone, plugins

    rows = []
    for plugin_name, plugin in plugins():
        for name in plugin.names():
            if name.startswith("timm:"):
                rows.append({"backbone": name, "plugin": plugin_name, "layer": "pool", "dim": None, "gflops": None,
                             "imagenet_offline": False, "note": "any timm model; needs timm, weights from its hub"})
                continue
            try:
                b = get_backbone(name)
                rows.append({"backbone": name, "plugin": plugin_name, "layer": b.layer, "dim": b.dim,
                             "gflops": round(b.gflops, 2), "imagenet_offline": b.offline(), "note": b.note})
            except CatdogError as e:
                rows.append({"backbone": name, "plugin": plugin_name, "layer": "", "dim": None, "gflops": None,
                             "imagenet_offline": False, "note": str(e)})
    if as_json:
        print(to_json(rows))
        return
    t = Table("backbone", "layer", "features", "GFLOP/image", "ImageNet weights here", "note", title="backbones")
    for r in rows:
        t.add_row(r["backbone"], r["layer"], f"{r['dim']:,}" if r["dim"] else "-",
                  f"{r['gflops']:.2f}" if r["gflops"] else "-", "yes" if r["imagenet_offline"] else "no",
                  escape(printable(r["note"])))
    out.print(t)
    out.print("Any torchvision classification model name works too (torchvision.models.list_models()).")
    out.print(bf16_line(), highlight=False)


def bf16_line() -> str:
    """Whether this CPU runs `--precision bf16` in hardware (backbones, info)."""
    from ..extract.precision import cpu_bf16

    kind = cpu_bf16()
    return (f"bf16 on this CPU: native ({kind}); --precision auto extracts in bf16 here" if kind else
            "bf16 on this CPU: emulated (no AVX512-BF16 or AMX): slower than fp32; --precision auto keeps fp32")

