"""The embedded demo cohort, generated from nilearn's MNI152 (runs only when `cohort` is empty)."""

if config["cohort"] is None:

    rule demo_data:
        """Generate the synthetic demo cohort and its ground truth."""
        output:
            manifest=layout.demo_manifest(config["demo"]["dir"]),
            files=PLAN.cohort_images(),
        conda:
            CONDA_ENV
        log:
            layout.job_log(OUT, "demo_data"),
        benchmark:
            layout.job_benchmark(OUT, "demo_data")
        params:
            demo=config["demo"],
            contrasts=" ".join(config["demo"]["contrasts"]),
        # One subject per core, each rendered on one thread (the same files for any count).
        threads: workflow.cores
        resources:
            mem_mb=2000,
            runtime=15,
        shell:
            "atlasflow --threads 1 demo-data {params.demo[dir]} --workers {threads} --seed {params.demo[seed]} "
            "--n-cross {params.demo[n_cross]} --n-long {params.demo[n_long]} "
            "--n-timepoints {params.demo[n_timepoints]} --spacing {params.demo[spacing_mm]} "
            "--contrasts {params.contrasts} > {log} 2>&1"
