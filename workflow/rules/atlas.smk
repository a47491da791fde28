"""Unbiased atlas: iteration 0 = affine mean; iteration i = register -> average -> shape update.

Each iteration is its own set of targets (`iter-{iteration}`), so raising `atlas.iterations` reruns
only the new iterations and what follows them.
"""

# (A local run's atlas jobs share one warm engine: enabled in common.smk's onstart.)


rule atlas_init:
    """Iteration 0: every member's affine to the reference template (one job, worker processes as
    in the iterations), and their mean (atlas.init: mean) or the reference itself (template).
    The atlas thus needs only the preprocessed scans, not the registrations to the template."""
    input:
        template=layout.template(OUT),
        mask=layout.template_mask(OUT),
        images=PLAN.member_images(),
        masks=PLAN.member_masks(),
        model=PLAN.model_input,
    output:
        template=PLAN.iteration_template(0),
        affines=PLAN.member_affines(),
        members=layout.iteration_members(OUT, 0),
    conda:
        CONDA_ENV
    log:
        layout.job_log(OUT, "atlas", layout.iteration_name(0)),
    benchmark:
        layout.job_benchmark(OUT, "atlas_init")
    params:
        # Plain values are compared with the last run's when Snakemake plans (functions of
        # `input` are not): a changed setting reruns the rule.
        settings=PLAN.atlas_init_settings,
        argv=lambda wc, input, output, threads: [
            "--threads", threads, "atlas", "init", "--template", input.template, "--template-mask", input.mask,
            "--images", *input.images, "--masks", *input.masks, *PLAN.atlas_init_flags(),
            "--output", output.template, "--out-affines", *output.affines, "--out-members", output.members,
        ],
    threads: config["atlas"]["threads"]
    resources:
        mem_mb=lambda wc, threads: 1000 + 700 * threads,
        runtime=lambda wc, threads: 10 + len(PLAN.members) // max(threads, 1),
        gpu=0,
    script:
        "../scripts/atlasflow_cli.py"


rule atlas_finetune:
    """Optional (atlas.finetune_steps > 0): the velocity network fine-tuned, unsupervised, on the
    atlas members against iteration 0; the atlas iterations then register with it."""
    input:
        fixed=PLAN.iteration_template(0),
        fixed_mask=layout.template_mask(OUT),
        images=PLAN.member_images(),
        masks=PLAN.member_masks(),
        model=PLAN.model_input,
    output:
        PLAN.finetuned_model,
    conda:
        CONDA_ENV
    log:
        layout.job_log(OUT, "atlas", "finetune"),
    benchmark:
        layout.job_benchmark(OUT, "atlas_finetune")
    params:
        settings=PLAN.atlas_finetune_settings,
        argv=lambda wc, input, output, threads: [
            "finetune", "--images", *input.images, "--masks", *input.masks, "--fixed", input.fixed,
            "--fixed-mask", input.fixed_mask, "--out", output[0], *PLAN.atlas_finetune_flags(),
            "--threads", threads, *(["--init", input.model[0]] if input.model else []),
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
        unpack(PLAN.carried_velocities),
        previous=PLAN.previous_template,
        mask=layout.template_mask(OUT),
        images=PLAN.member_images(),
        masks=PLAN.member_masks(),
        affines=PLAN.member_affines(),
        model=PLAN.atlas_model_input,
    output:
        template=PLAN.iteration_template("{iteration}"),
        metrics=layout.iteration_metrics(OUT, "{iteration}"),
        members=layout.iteration_members(OUT, "{iteration}"),
        velocities=PLAN.iteration_velocities("{iteration}") if PLAN.carry else [],
        mean_velocity=PLAN.iteration_mean_velocity("{iteration}") if PLAN.carry else [],
    conda:
        CONDA_ENV
    log:
        layout.job_log(OUT, "atlas", layout.iteration_name("{iteration}")),
    benchmark:
        layout.job_benchmark(OUT, "atlas_iteration", layout.iteration_name("{iteration}"))
    params:
        # Plain values (not functions of `input`) are compared with the last run's: a changed
        # setting reruns the iterations.
        settings=PLAN.atlas_iteration_settings,
        argv=lambda wc, input, output, threads: [
            "--threads", threads, "atlas", "iteration", "--iteration", wc.iteration,
            "--previous", input.previous, "--mask", input.mask,
            "--images", *input.images, "--masks", *input.masks, "--affines", *input.affines,
            *PLAN.atlas_iteration_flags(),
            "--output", output.template, "--out-metrics", output.metrics, "--out-members", output.members,
            *(["--velocities", *input.velocities, "--mean-velocity", input.mean_velocity] if hasattr(input, "velocities") else []),
            *(["--out-velocities", *output.velocities, "--out-mean-velocity", output.mean_velocity] if PLAN.carry else []),
        ],
    threads: config["atlas"]["threads"]
    resources:
        # one engine per worker (~700 MB each at 2 mm) + the two running sums
        mem_mb=lambda wc, threads: 1000 + 700 * threads,
        runtime=lambda wc, threads: 10 + 2 * len(PLAN.members) // max(threads, 1),
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
        template=PLAN.iteration_template(PLAN.n_iter),
        metrics=[layout.iteration_metrics(OUT, i) for i in range(1, PLAN.n_iter + 1)],
    output:
        template=PLAN.atlas,
        metrics=layout.atlas_metrics(OUT),
    conda:
        CONDA_ENV
    log:
        layout.job_log(OUT, "atlas", "final"),
    benchmark:
        layout.job_benchmark(OUT, "atlas_final")
    shell:
        "(cp {input.template} {output.template} && "
        "atlasflow atlas gather --metrics {input.metrics} --output {output.metrics}) > {log} 2>&1"


if PLAN.batch_atlas_registrations:

    ruleorder: register_atlas_members > register_atlas

    rule register_atlas_members:
        """The atlas members registered to the final atlas in one job, each from where the last
        iteration left it (its velocity, moved by that iteration's shape update), with the files
        register_atlas writes for any other scan. One job pays the engine's start-up once; its
        threads are worker processes, one member each."""
        input:
            atlas=PLAN.atlas,
            mask=layout.template_mask(OUT),
            images=PLAN.member_images(),
            masks=PLAN.member_masks(),
            affines=PLAN.member_affines(),
            velocities=PLAN.iteration_velocities(PLAN.n_iter),
            mean_velocity=PLAN.iteration_mean_velocity(PLAN.n_iter),
            model=PLAN.model_input,
        output:
            **PLAN.member_atlas_registrations(),
        conda:
            CONDA_ENV
        log:
            layout.job_log(OUT, "atlas", "register_members"),
        benchmark:
            layout.job_benchmark(OUT, "register_atlas_members")
        params:
            # compared with the last run's when Snakemake plans: a changed setting reruns it
            options=PLAN.registration_options,
            qc=PLAN.qc_options,
            gradient_step=PLAN.atl["gradient_step"],
            argv=lambda wc, input, output, threads: [
                "--threads", threads, "atlas", "register", "--previous", input.atlas, "--mask", input.mask,
                "--images", *input.images, "--masks", *input.masks, "--affines", *input.affines,
                "--velocities", *input.velocities, "--mean-velocity", input.mean_velocity,
                "--gradient-step", PLAN.atl["gradient_step"],
                *PLAN.registration_options(wc).split(), *PLAN.qc_options(wc).split(),
                "--out-images", *output.warped, "--out-member-affines", *output.affine,
                "--out-warps", *output.warp, "--out-inverse-warps", *output.inverse_warp,
                "--out-metrics-files", *output.metrics,
            ],
        threads: config["atlas"]["threads"]
        resources:
            mem_mb=lambda wc, threads: 1000 + 700 * threads,
            runtime=lambda wc, threads: 10 + 2 * len(PLAN.members) // max(threads, 1),
            gpu=0,
        script:
            "../scripts/atlasflow_cli.py"


# Every other scan (not an atlas member, or every scan without carried velocities) registered to
# the final atlas: transforms and the scan in atlas space.
use rule register_template as register_atlas with:
    input:
        **PLAN.registration_inputs(fixed=PLAN.atlas),
    output:
        **PLAN.registration_outputs("atlas", warped=ref(space="atlas")),
    params:
        # one contrast (the reference on its own atlas): never --cross-contrast
        options=PLAN.registration_options,
        qc=PLAN.qc_options,
    log:
        log("register_atlas"),
    benchmark:
        bench("register_atlas")


use rule warp_labels as warp_labels_atlas with:
    input:
        labels=anat("dseg", desc="preproc"),
        fixed=PLAN.atlas,
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
        PLAN.member_labels(),
    output:
        dseg=layout.atlas_dseg(OUT),
        probseg=layout.atlas_probseg(OUT),
    conda:
        CONDA_ENV
    log:
        layout.job_log(OUT, "atlas", "labels"),
    benchmark:
        layout.job_benchmark(OUT, "atlas_labels")
    params:
        argv=lambda wc, input, output: ["atlas", "vote", "--labels", *input, "--output", output.dseg, "--out-probseg", output.probseg],
    resources:
        mem_mb=4500,
        runtime=10,
    script:
        "../scripts/atlasflow_cli.py"
