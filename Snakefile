"""atlasflow: cohort brain MRI preprocessing, deep registration, atlases and tumour-growth maps.

Thin entry point: configuration and cohort validation, then one rules file per stage.
"""

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/register.smk"
include: "workflow/rules/atlas.smk"
include: "workflow/rules/longitudinal.smk"
include: "workflow/rules/contrasts.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/provenance.smk"


rule all:
    """Every preprocessed scan, its registrations to the template and the atlas, and the atlas."""
    input:
        PLAN.all_targets(),
        layout.cohort_page(OUT),
    default_target: True
