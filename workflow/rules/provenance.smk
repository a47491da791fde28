"""Provenance of the run: what the outputs were made from (see docs/reproducibility.md)."""

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
        layout.provenance(OUT),
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
        "{params.model} --threads {threads} --output {output} > {log} 2>&1"
