"""Registration of every preprocessed scan to the template (deep backend by default)."""

rule register_template:
    """Align one preprocessed scan to the template: ITK affine + displacement field, warped image."""
    input:
        fixed=TEMPLATE,
        fixed_mask=TEMPLATE_MASK,
        moving=anat("T1w", desc="preproc"),
        moving_mask=anat("mask", desc="brain"),
        model=model_input,
    output:
        warped=anat("T1w", space="template", desc="warped"),
        affine=anat("xfm", from_="T1w", to="template", mode="image", ext="mat"),
        warp=anat("xfm", from_="T1w", to="template", mode="image"),
        inverse_warp=anat("xfm", from_="template", to="T1w", mode="image"),
        metrics=anat("xfm", from_="T1w", to="template", mode="image", desc="qc", ext="json"),
    conda:
        CONDA_ENV
    log:
        log("register_template"),
    benchmark:
        bench("register_template")
    params:
        options=registration_options,
        qc=qc_options,
    threads: THREADS
    resources:
        mem_mb=1500,
        runtime=15,
        gpu=0,
    shell:
        "atlasflow --threads {threads} register --fixed {input.fixed} --moving {input.moving} "
        "--fixed-mask {input.fixed_mask} --moving-mask {input.moving_mask} {params.options} {params.qc} "
        "--out-image {output.warped} --out-affine {output.affine} --out-warp {output.warp} "
        "--out-inverse-warp {output.inverse_warp} --out-metrics {output.metrics} > {log} 2>&1"


rule warp_labels:
    """A scan's label map carried into template space through its transform (label-aware)."""
    input:
        labels=anat("dseg", desc="preproc"),
        fixed=TEMPLATE,
        affine=anat("xfm", from_="T1w", to="template", mode="image", ext="mat"),
        warp=anat("xfm", from_="T1w", to="template", mode="image"),
    output:
        anat("dseg", space="template"),
    conda:
        CONDA_ENV
    log:
        log("warp_labels"),
    benchmark:
        bench("warp_labels")
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "atlasflow apply --fixed {input.fixed} --moving {input.labels} --affine {input.affine} "
        "--warp {input.warp} --interpolation nearest --output {output} > {log} 2>&1"
