"""Preprocessing of every scan's reference image (contrasts.reference, the T1w by default):
reorient -> N4 -> brain mask -> normalise + working grid."""


rule template:
    """The reference template and its brain mask on the working grid."""
    input:
        unpack(PLAN.template_files),
    output:
        image=layout.template(OUT),
        mask=layout.template_mask(OUT),
    # Eligible for Snakemake's between-workflow cache (`--cache`): no patient data goes in, and
    # the key (shell code, params incl. the versions below, template file checksums) determines
    # the output. The cache forbids a benchmark directive, hence none here.
    cache: True
    conda:
        CONDA_ENV
    log:
        layout.job_log(OUT, "template"),
    params:
        source=config["template"],
        mask=f"--mask {config['template_mask']}" if config["template_mask"] else "",
        spacing=config["working_spacing"],
        software=f"atlasflow {VERSIONS['atlasflow']}, nilearn {VERSIONS['nilearn']}",
    resources:
        mem_mb=2000,
        runtime=5,
    shell:
        "atlasflow template --source {params.source} {params.mask} --spacing {params.spacing} "
        "--out-image {output.image} --out-mask {output.mask} > {log} 2>&1"


rule reorient:
    """Reorder the voxel array to RAS from the header (no resampling)."""
    input:
        lambda wc: PLAN.row(wc)[PLAN.reference],
    output:
        temp(ref(desc="reoriented")),
    conda:
        CONDA_ENV
    log:
        log("reorient"),
    benchmark:
        bench("reorient")
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "atlasflow preprocess reorient --input {input} --output {output} > {log} 2>&1"


rule bias_correct:
    """N4 bias-field correction (atlasflow.preprocess.n4)."""
    input:
        ref(desc="reoriented"),
    output:
        temp(ref(desc="n4")),
    conda:
        CONDA_ENV
    log:
        log("n4"),
    benchmark:
        bench("bias_correct")
    params:
        skip="" if config["preprocess"]["n4"] else "--skip",
    threads: THREADS
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "atlasflow --threads {threads} preprocess n4 {params.skip} --input {input} --output {output} > {log} 2>&1"


rule brain_mask:
    """Brain mask on the scan's own grid: given, from labels, or carried in from the template."""
    input:
        unpack(PLAN.mask_inputs),
        image=ref(desc="n4"),
    output:
        temp(anat("mask", space="orig", desc="brain")),
    conda:
        CONDA_ENV
    log:
        log("brain_mask"),
    benchmark:
        bench("brain_mask")
    params:
        extra=PLAN.mask_args,
    threads: THREADS
    resources:
        mem_mb=3000,
        runtime=10,
    shell:
        "atlasflow --threads {threads} preprocess mask --input {input.image} --output {output} {params.extra} > {log} 2>&1"


rule preprocess:
    """Intensity normalisation in the brain and resampling onto the working grid."""
    input:
        image=ref(desc="n4"),
        mask=anat("mask", space="orig", desc="brain"),
    output:
        image=ref(desc="preproc"),
        mask=anat("mask", desc="brain"),
    conda:
        CONDA_ENV
    log:
        log("preprocess"),
    benchmark:
        bench("preprocess")
    params:
        spacing=config["working_spacing"],
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "atlasflow preprocess finalize --input {input.image} --mask {input.mask} --output {output.image} "
        "--out-mask {output.mask} --spacing {params.spacing} > {log} 2>&1"


rule preprocess_labels:
    """The scan's label map (or tumour mask) on its working grid (nearest neighbour: labels are
    never averaged)."""
    input:
        labels=lambda wc: PLAN.row(wc)["labels"],
        reference=ref(desc="preproc"),
    output:
        anat("dseg", desc="preproc"),
    conda:
        CONDA_ENV
    log:
        log("preprocess_labels"),
    benchmark:
        bench("preprocess_labels")
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "atlasflow preprocess carry --input {input.labels} --reference {input.reference} --output {output} > {log} 2>&1"


rule preprocess_tumor_mask:
    """The scan's tumour or lesion mask on its working grid (nearest neighbour). A mask drawn on
    another contrast of the session (a lesion mask on the FLAIR) is carried through that
    contrast's alignment to the session's reference."""
    input:
        unpack(PLAN.contrasts.mask_grid_inputs),
        labels=lambda wc: PLAN.row(wc)["tumor_mask"],
        reference=ref(desc="preproc"),
    output:
        anat("mask", label="tumor", desc="preproc"),
    conda:
        CONDA_ENV
    log:
        log("preprocess_tumor_mask"),
    benchmark:
        bench("preprocess_tumor_mask")
    params:
        grids=PLAN.contrasts.mask_grid_flags,
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "atlasflow preprocess carry --input {input.labels} --reference {input.reference} {params.grids} "
        "--lesion --output {output} > {log} 2>&1"
