"""A session's other contrasts (T2w, FLAIR, post-contrast T1w, PDw, and the T1w when another
contrast is the reference): one set of rules per contrast the cohort has
(atlasflow.contrasts.plan). Each contrast is aligned to its session's reference (contrasts.reference,
the T1w by default) once and then resampled once into every space through composed transforms."""

CONTRASTS = PLAN.contrasts
cfiles = CONTRASTS.files

for c in CONTRASTS.used:

    rule:
        name:
            f"align_{c}"
        input:
            contrast=lambda wc, c=c: PLAN.row(wc)[c],
            reference=ref(desc="preproc"),
            mask=anat("mask", desc="brain"),
        output:
            native=cfiles.native(c),
            preproc=cfiles.preproc(c),
            affine=cfiles.session_affine(c),
            metrics=cfiles.session_qc(c),
        conda:
            CONDA_ENV
        log:
            log(f"align_{c}"),
        benchmark:
            bench(f"align_{c}")
        params:
            options=CONTRASTS.align_flags(),
            n4="" if config["preprocess"]["n4"] else "--no-n4",
        threads: THREADS
        resources:
            mem_mb=3000,
            runtime=15,
        shell:
            "atlasflow --threads {threads} contrast align --input {input.contrast} --reference {input.reference} "
            "--reference-mask {input.mask} {params.options} {params.n4} --out-native {output.native} "
            "--out-preproc {output.preproc} --out-affine {output.affine} --out-metrics {output.metrics} > {log} 2>&1"

    for space, fixed in (("template", layout.template(OUT)), ("atlas", PLAN.atlas)):

        rule:
            name:
                f"{c}_to_{space}"
            input:
                image=cfiles.native(c),
                session_affine=cfiles.session_affine(c),
                fixed=fixed,
                **xfm(space),
            output:
                cfiles.in_space(c, space),
            conda:
                CONDA_ENV
            log:
                log(f"{c}_to_{space}"),
            benchmark:
                bench(f"{c}_to_{space}")
            resources:
                mem_mb=1500,
                runtime=5,
            shell:
                "atlasflow contrast warp --input {input.image} --session-affine {input.session_affine} "
                "--affine {input.affine} --warp {input.warp} --fixed {input.fixed} --output {output} > {log} 2>&1"

    rule:
        name:
            f"atlas_{c}"
        input:
            lambda wc, c=c: CONTRASTS.member_images(c),
        output:
            layout.atlas_contrast(OUT, c),
        conda:
            CONDA_ENV
        log:
            layout.job_log(OUT, "atlas", f"atlas_{c}"),
        benchmark:
            layout.job_benchmark(OUT, f"atlas_{c}")
        resources:
            mem_mb=1500,
            runtime=5,
        shell:
            "atlasflow contrast average --inputs {input} --output {output} > {log} 2>&1"

    rule:
        name:
            f"{c}_change"
        input:
            image=cfiles.native(c),
            session_affine=cfiles.session_affine(c),
            baseline=CONTRASTS.baseline_file(c, "preproc"),
            baseline_native=CONTRASTS.baseline_file(c, "native"),
            baseline_session_affine=CONTRASTS.baseline_file(c, "session_affine"),
            **xfm("baseline"),
        output:
            warped=cfiles.in_space(c, "baseline"),
            difference=cfiles.difference(c, "baseline"),
        conda:
            CONDA_ENV
        log:
            log(f"{c}_change"),
        benchmark:
            bench(f"{c}_change")
        params:
            deformable="--deformable" if CONTRASTS.change == "deformable" else "",
        threads: THREADS
        resources:
            mem_mb=2000,
            runtime=10,
        shell:
            "atlasflow --threads {threads} contrast change --input {input.image} --session-affine {input.session_affine} "
            "--baseline-native {input.baseline_native} --baseline-session-affine {input.baseline_session_affine} "
            "--affine {input.affine} --warp {input.warp} --baseline {input.baseline} {params.deformable} "
            "--output {output.warped} --out-difference {output.difference} > {log} 2>&1"

    rule:
        name:
            f"{c}_change_to_atlas"
        input:
            image=cfiles.difference(c, "baseline"),
            atlas=PLAN.atlas,
            **PLAN.baseline_xfm("atlas"),
        output:
            cfiles.difference(c, "atlas"),
        conda:
            CONDA_ENV
        log:
            log(f"{c}_change_to_atlas"),
        benchmark:
            bench(f"{c}_change_to_atlas")
        resources:
            mem_mb=1500,
            runtime=5,
        shell:
            "atlasflow longitudinal to-atlas --input {input.image} --atlas {input.atlas} --affine {input.affine} "
            "--warp {input.warp} --interpolation linear --output {output} > {log} 2>&1"
