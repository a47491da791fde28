"""Registration of every preprocessed scan to the template (deep backend by default; a reference
contrast other than T1w goes the engine's contrast-independent way, --cross-contrast)."""

rule register_template:
    """Align one preprocessed scan to the template: ITK affine + displacement field, warped image."""
    input:
        **PLAN.registration_inputs(fixed=layout.template(OUT)),
    output:
        **PLAN.registration_outputs("template", warped=ref(space="template", desc="warped")),
    conda:
        CONDA_ENV
    log:
        log("register_template"),
    benchmark:
        bench("register_template")
    params:
        options=PLAN.template_registration_options,
        qc=PLAN.qc_options,
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
    """A scan's label map (or mask) carried onto another grid through its transform (nearest
    neighbour: labels are never averaged)."""
    input:
        labels=anat("dseg", desc="preproc"),
        fixed=layout.template(OUT),
        **xfm("template"),
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
