"""Render deploy/kubernetes's Helm chart offline and validate every manifest against the Kubernetes API schemas.

No cluster and no helm binary: Helm's own Go SDK (the helm-python-sdk wheel) renders the chart as
`helm template` would, values.schema.json and the templates' `fail` checks included; kubernetes-validate
checks each object against the API schemas it ships (strict: an unknown field is an error), for the oldest
Kubernetes the chart allows and the newest the package knows. Objects of add-ons (the Prometheus
Operator's ServiceMonitor, KEDA's ScaledObject) have no schema there: they are rendered and parsed only.

Usage: python scripts/kubernetes_chart.py                 render and validate every case (make lint)
       python scripts/kubernetes_chart.py --write-schema  regenerate values.schema.json's `settings` (make docs)
Exit 1 when a case fails to render or an object is invalid; every problem is printed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from entrypoint.base.config import SETTINGS  # noqa: E402
from entrypoint.base.settings import FALSE_WORDS, TRUE_WORDS, Setting  # noqa: E402
from entrypoint.gate.config import GATE_SETTINGS  # noqa: E402

CHART = REPO / "deploy" / "kubernetes" / "chart"
OVERLAYS_DIR = REPO / "deploy" / "kubernetes" / "overlays"
SCHEMA_FILE = CHART / "values.schema.json"
RELEASE, NAMESPACE = "vllm", "default"
# The chart's kubeVersion (>= 1.30) and the newest API schemas kubernetes-validate 1.37.0 ships.
KUBERNETES_VERSIONS = ("1.30", "1.37")
ADDON_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}
# Variables the pod sets itself: the gate on the Service's port, vLLM on loopback; GATE_MODELS from `models`.
FIXED_BY_THE_POD = ("GATE_HOST", "GATE_PORT", "GATE_UPSTREAM", "GATE_MODELS")
# Every optional object on, so that the check renders them too.
ADDONS_ON = {"prometheus": {"serviceMonitor": {"enabled": True}}, "autoscaling": {"keda": {"enabled": True}}}


def overlays() -> list[Path]:
    return sorted(OVERLAYS_DIR.glob("*.yaml"))


def cases() -> dict[str, dict]:
    """Every values combination `make lint` renders: the chart's defaults, each overlay, the add-ons on."""
    found = {"defaults": {}, "add-ons on": ADDONS_ON}
    found.update({f"overlays/{path.name}": yaml.safe_load(path.read_text()) or {} for path in overlays()})
    return found


def render(values: dict | None = None) -> list[dict]:
    """The chart's objects with `values` over its defaults, as `helm template` prints them.

    Raises helm_python.HelmValuesError (values.schema.json) or HelmRenderError (a template's `fail`).
    """
    import helm_python  # imported here: an 85 MB Go library, loaded only by what renders

    with helm_python.Chart.load(str(CHART)) as chart:
        files = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    objects = []
    for path, text in sorted(files.items()):
        if path.endswith(".yaml"):
            objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def problems_of(objects: Iterable[dict]) -> list[str]:
    """What kubernetes-validate finds wrong with each object, for every version checked."""
    import kubernetes_validate

    found = []
    for obj in objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if (obj.get("apiVersion"), obj.get("kind")) in ADDON_KINDS:
            if not obj.get("metadata", {}).get("name") or not isinstance(obj.get("spec"), dict):
                found.append(f"{name}: no metadata.name or spec")
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = ".".join(str(part) for part in error.path)
                found.append(f"{name} (Kubernetes {version}): {where}: {error.message}")
            except kubernetes_validate.SchemaNotFoundError as error:
                found.append(f"{name}: {error.message}")
    return found


def setting_schema(setting: Setting) -> dict:
    """One variable's JSON schema, from its row in the settings table (kind, bounds, choices)."""
    schema: dict = {"description": setting.help}
    if setting.kind in ("int", "float"):
        schema.update(
            type="integer" if setting.kind == "int" else "number", minimum=setting.minimum, maximum=setting.maximum
        )
    elif setting.kind == "choice":
        schema.update(type="string", enum=list(setting.choices))
    elif setting.kind == "bool":
        schema.update(enum=[True, False, *TRUE_WORDS, *FALSE_WORDS])
    else:
        schema.update(type="string")
    return schema


def settings_schema() -> dict:
    table = list(SETTINGS.values()) + list(GATE_SETTINGS.values())
    return {s.env: setting_schema(s) for s in table if s.env not in FIXED_BY_THE_POD}


def schema_text() -> str:
    """values.schema.json with its `settings` properties generated from the tables."""
    schema = json.loads(SCHEMA_FILE.read_text())
    schema["properties"]["settings"]["properties"] = settings_schema()
    return json.dumps(schema, indent=2) + "\n"


def check() -> int:
    failed = False
    for case, values in cases().items():
        try:
            objects = render(values)
        except Exception as error:  # a HelmError's message is the whole story
            print(f"FAIL {case}: {type(error).__name__}: {error}")
            failed = True
            continue
        found = problems_of(objects)
        kinds = ", ".join(sorted({obj["kind"] for obj in objects}))
        versions = " and ".join(KUBERNETES_VERSIONS)
        for problem in found:
            print(f"FAIL {case}: {problem}")
        if not found:
            print(f"ok   {case}: {len(objects)} objects ({kinds}), valid for Kubernetes {versions}")
        failed = failed or bool(found)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if argv == ["--write-schema"]:
        SCHEMA_FILE.write_text(schema_text())
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    return check()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
