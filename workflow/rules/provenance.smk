"""Provenance of the run: what the outputs were made from (see docs/reproducibility.md), the output
folder's dataset_description.json, and the inputs of the cohort that were skipped."""

import json


rule provenance:
    """Package versions, effective config, SHA-256 of the cohort files and weights, git revision."""
    input:
        # Inputs and params are exactly what the record describes: a new or edited input file, a
        # config change, a package upgrade or a new commit reruns this rule. Nothing depends on
        # its output, so that rerun stops here.
        unpack(PLAN.template_files),
        cohort=PLAN.cohort_files(),
        model=PLAN.model_input,
    output:
        record=layout.provenance(OUT),
        description=layout.dataset_description(OUT),
    conda:
        CONDA_ENV
    log:
        layout.job_log(OUT, "provenance"),
    benchmark:
        layout.job_benchmark(OUT, "provenance")
    params:
        config=json.dumps(config, sort_keys=True),
        versions=json.dumps(VERSIONS, sort_keys=True),
        commit=WORKFLOW_COMMIT or "",
        workflow_dir=workflow.basedir,
        model=lambda wc, input: f"--model {input.model}" if input.model else "",
    threads: THREADS
    resources:
        mem_mb=500,
        runtime=10,
    shell:
        "atlasflow provenance --config-json {params.config:q} --workflow-dir {params.workflow_dir:q} "
        "{params.model} --threads {threads} --output {output.record} "
        "--description {output.description} > {log} 2>&1"


rule skipped_inputs:
    """Inputs of a BIDS cohort that were skipped or passed over for another file, with the reason
    (the cohort report's "Inputs skipped"). It reruns when that list changes (its digest is a
    param), and only then, so the cohort report does not follow every change of the record."""
    output:
        layout.skipped_inputs(OUT),
    conda:
        CONDA_ENV
    log:
        layout.job_log(OUT, "skipped_inputs"),
    benchmark:
        layout.job_benchmark(OUT, "skipped_inputs")
    params:
        # What the cohort table is read from, and nothing else of the config.
        config=json.dumps(PLAN.cohort_settings(), sort_keys=True),
        digest=PLAN.skipped_digest(),
        workflow_dir=workflow.basedir,
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "atlasflow provenance --config-json {params.config:q} --workflow-dir {params.workflow_dir:q} "
        "--skipped {output} > {log} 2>&1"
