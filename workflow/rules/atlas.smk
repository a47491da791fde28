"""Unbiased atlas: iteration 0 = affine mean; iteration i = register -> average -> shape update.

Each iteration is its own set of targets (`iter-{iteration}`), so raising `atlas.iterations` reruns
only the new iterations and what follows them.
"""

onstart:
    # The atlas jobs of a local run share one warm engine (torch, weights, workers), which exits
    # with this process; jobs on cluster nodes start their own (atlasflow.runtime.server).
    if ATL["warm_engine"] and workflow.local_exec:
        enable_engine()


rule atlas_init:
    """Iteration 0: every member's affine to the reference template (one job, worker processes as
    in the iterations), and their mean (atlas.init: mean) or the reference itself (template).
    The atlas thus needs only the preprocessed scans, not the registrations to the template."""
    input:
        template=TEMPLATE,
        mask=TEMPLATE_MASK,
        images=[anat("T1w", s, t, desc="preproc") for s, t in ATLAS_MEMBERS],
        masks=[anat("mask", s, t, desc="brain") for s, t in ATLAS_MEMBERS],
        model=model_input,
    output:
        template=iter_file(0, "template_T1w.nii.gz"),
        affines=ATLAS_AFFINES,
        members=iter_file(0, "members.tsv"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/atlas/iter-0.log",
    benchmark:
        f"{BENCH}/atlas_init.tsv"
    params:
        # Plain values are compared with the last run's when Snakemake plans (functions of
        # `input` are not): a changed setting reruns the rule.
        settings=f"init {ATL['init']} {registration_options(None, 'atlas_init')}",
        argv=lambda wc, input, output, threads: [
            "--threads", threads, "atlas", "init", "--template", input.template, "--template-mask", input.mask,
            "--images", *input.images, "--masks", *input.masks, "--init", ATL["init"],
            *registration_options(None, "atlas_init").split(), *MIN_MEMBERS.split(),
            "--output", output.template, "--out-affines", *output.affines, "--out-members", output.members,
        ],
    threads: ATL["threads"]
    resources:
        mem_mb=lambda wc, threads: 1000 + 700 * threads,
        runtime=lambda wc, threads: 10 + len(ATLAS_MEMBERS) // max(threads, 1),
        gpu=0,
    script:
        "../scripts/atlasflow_cli.py"


rule atlas_finetune:
    """Optional (atlas.finetune_steps > 0): the velocity network fine-tuned, unsupervised, on the
    atlas members against iteration 0; the atlas iterations then register with it."""
    input:
        fixed=iter_file(0, "template_T1w.nii.gz"),
        fixed_mask=TEMPLATE_MASK,
        images=[anat("T1w", s, t, desc="preproc") for s, t in ATLAS_MEMBERS],
        masks=[anat("mask", s, t, desc="brain") for s, t in ATLAS_MEMBERS],
        model=model_input,
    output:
        FINETUNED_MODEL,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/atlas/finetune.log",
    benchmark:
        f"{BENCH}/atlas_finetune.tsv"
    params:
        settings=f"steps {ATL['finetune_steps']} seed {REG['seed']}",
        argv=lambda wc, input, output, threads: [
            "finetune", "--images", *input.images, "--masks", *input.masks, "--fixed", input.fixed,
            "--fixed-mask", input.fixed_mask, "--out", output[0], "--steps", ATL["finetune_steps"],
            "--seed", REG["seed"], "--threads", threads, *(["--init", input.model[0]] if input.model else []),
        ],
    threads: THREADS
    resources:
        mem_mb=3000,
        runtime=60,
    script:
        "../scripts/atlasflow_cli.py"


rule atlas_iteration:
    """Iteration i in one job: every member registered to template i-1 (from its affine to the
    reference template), then average -> shape update (-> sharpen). One job per iteration pays the
    engine's start-up once and keeps the warped members in memory; its threads are worker
    processes, one member each."""
    input:
        unpack(carried_velocities),
        previous=previous_template,
        mask=TEMPLATE_MASK,
        images=[anat("T1w", s, t, desc="preproc") for s, t in ATLAS_MEMBERS],
        masks=[anat("mask", s, t, desc="brain") for s, t in ATLAS_MEMBERS],
        affines=ATLAS_AFFINES,
        model=atlas_model_input,
    output:
        template=iter_file("{iteration}", "template_T1w.nii.gz"),
        metrics=iter_file("{iteration}", "metrics.json"),
        members=iter_file("{iteration}", "members.tsv"),
        velocities=iter_velocities("{iteration}") if CARRY else [],
        mean_velocity=iter_mean_velocity("{iteration}") if CARRY else [],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/atlas/iter-{{iteration}}.log",
    benchmark:
        f"{BENCH}/atlas_iteration/iter-{{iteration}}.tsv"
    params:
        # Plain values (not functions of `input`) are compared with the last run's: a changed
        # setting reruns the iterations.
        settings=f"{atlas_registration_options(None)} gradient_step {ATL['gradient_step']} sharpen {ATL['sharpen']} carry {CARRY}",
        argv=lambda wc, input, output, threads: [
            "--threads", threads, "atlas", "iteration", "--iteration", wc.iteration,
            "--previous", input.previous, "--mask", input.mask,
            "--images", *input.images, "--masks", *input.masks, "--affines", *input.affines,
            *atlas_registration_options(wc).split(), *(["--model", FINETUNED_MODEL] if FINETUNE else []),
            "--gradient-step", ATL["gradient_step"],
            *([] if ATL["sharpen"] else ["--no-sharpen"]), *MIN_MEMBERS.split(),
            "--output", output.template, "--out-metrics", output.metrics, "--out-members", output.members,
            *(["--velocities", *input.velocities, "--mean-velocity", input.mean_velocity] if hasattr(input, "velocities") else []),
            *(["--out-velocities", *output.velocities, "--out-mean-velocity", output.mean_velocity] if CARRY else []),
        ],
    threads: ATL["threads"]
    resources:
        # one engine per worker (~700 MB each at 2 mm) + the two running sums
        mem_mb=lambda wc, threads: 1000 + 700 * threads,
        runtime=lambda wc, threads: 10 + 2 * len(ATLAS_MEMBERS) // max(threads, 1),
        gpu=0,
    script:
        "../scripts/atlasflow_cli.py"


# A file copy and a small table: on a cluster a job of its own would only add a queue round trip
# between the last iteration and the registrations to the atlas.
localrules:
    atlas_final,


rule atlas_final:
    """The final atlas (last iteration's template) and the per-iteration metrics table."""
    input:
        template=iter_file(N_ITER, "template_T1w.nii.gz"),
        metrics=[iter_file(i, "metrics.json") for i in range(1, N_ITER + 1)],
    output:
        template=ATLAS_T1W,
        metrics=ATLAS_METRICS,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/atlas/final.log",
    benchmark:
        f"{BENCH}/atlas_final.tsv"
    shell:
        "(cp {input.template} {output.template} && "
        "atlasflow atlas gather --metrics {input.metrics} --output {output.metrics}) > {log} 2>&1"


# Every scan registered to the final atlas: transforms and the scan in atlas space.
use rule register_template as register_atlas with:
    input:
        **registration_inputs(fixed=ATLAS_T1W),
    output:
        **registration_outputs("atlas", warped=anat("T1w", space="atlas")),
    log:
        log("register_atlas"),
    benchmark:
        bench("register_atlas")


use rule warp_labels as warp_labels_atlas with:
    input:
        labels=anat("dseg", desc="preproc"),
        fixed=ATLAS_T1W,
        **xfm("atlas"),
    output:
        anat("dseg", space="atlas"),
    log:
        log("warp_labels_atlas"),
    benchmark:
        bench("warp_labels_atlas")


rule atlas_labels:
    """Atlas label map: majority vote of the members' labels in atlas space, + probabilities."""
    input:
        [anat("dseg", s, t, space="atlas") for s, t in ATLAS_MEMBERS if has(s, t, "labels")],
    output:
        dseg=ATLAS_DSEG,
        probseg=f"{ATLAS}/atlas_probseg.nii.gz",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/atlas/labels.log",
    benchmark:
        f"{BENCH}/atlas_labels.tsv"
    params:
        argv=lambda wc, input, output: ["atlas", "vote", "--labels", *input, "--output", output.dseg, "--out-probseg", output.probseg],
    resources:
        mem_mb=4500,
        runtime=10,
    script:
        "../scripts/atlasflow_cli.py"
