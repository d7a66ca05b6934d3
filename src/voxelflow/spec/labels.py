"""The spec's ``labels``: what each class index of the network's output is, for DICOM results.

``labels: {1: {name: spleen}}`` names class 1; ``category`` and ``type`` give the segmented property's
codes (SNOMED CT, DCM or any coding scheme) where the name alone does not find them. The mapping is
checked against the network's ``out_channels`` at load and travels with the registered model, so a
DICOM Segmentation written by any later prediction names and codes its segments the same way.
"""

from __future__ import annotations

from pydantic import Field

from voxelflow.spec.sections import _Section


class CodeSpec(_Section):
    value: str = Field(min_length=1, max_length=64, description="the code value")
    scheme: str = Field("SCT", min_length=1, max_length=16, description="the coding scheme designator (SCT: "
                        "SNOMED CT, DCM: DICOM's own, or any other)", examples=["SCT"])
    meaning: str = Field(min_length=1, max_length=64, description="the code meaning, as the scheme words it")


class LabelSpec(_Section):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[^\\\r\n]+$",
                      description="the class's name: the DICOM segment's label; a name SNOMED CT knows (spleen, "
                      "liver, tumor, portal vein, ...) also gives its codes", examples=["spleen"])
    category: CodeSpec | None = Field(None, description="the segmented property category; unset: Anatomical "
                                      "Structure (Morphologically Abnormal Structure for a tumor, lesion, ...; "
                                      "Tissue for a name SNOMED CT does not know)")
    type: CodeSpec | None = Field(None, description="the segmented property type; unset: SNOMED CT's code for "
                                  "the name, or Tissue for a name it does not know")


def labels_problem(labels: dict[int, LabelSpec], out_channels: int) -> tuple[str, str] | None:
    """(key, message) for the first label the network cannot give or a name given twice; None when they are fine."""
    seen: dict[str, int] = {}
    for index, label in sorted(labels.items()):
        if not 1 <= index < out_channels:
            return (str(index), f"class {index} is not one the network gives: its foreground classes are "
                    f"1..{out_channels - 1} (train.network out_channels {out_channels}; 0 is the background)")
        name = label.name.strip().lower()
        if name in seen:
            return (f"{index}.name", f"{label.name!r} names class {seen[name]} too; each class needs its own name")
        seen[name] = index
    return None
