"""Longitudinal tumour monitoring: every follow-up registered to its subject's baseline (the
reference contrast's images: the T1w by default)."""


rule longitudinal_register:
    """Follow-up -> baseline with the tumours excluded; log-Jacobian, difference, displacement maps."""
    input:
        unpack(PLAN.longitudinal_inputs),
        model=PLAN.model_input,
    output:
        warped=ref(space="baseline", desc="warped"),
        **xfm("baseline"),
        log_jacobian=anat("map", space="baseline", desc="logjacobian"),
        difference=ref(space="baseline", desc="difference"),
        displacement=anat("map", space="baseline", desc="displacement"),
        metrics=PLAN.qc_json("baseline"),
    conda:
        CONDA_ENV
    log:
        log("longitudinal_register"),
    benchmark:
        bench("longitudinal_register")
    params:
        options=PLAN.longitudinal_options,
        tumors=PLAN.tumor_flags,
    threads: THREADS
    resources:
        mem_mb=1500,
        runtime=15,
        gpu=0,
    shell:
        "atlasflow --threads {threads} longitudinal pair --baseline {input.baseline} --followup {input.followup} "
        "--baseline-mask {input.baseline_mask} --followup-mask {input.followup_mask} {params.tumors} "
        "{params.options} --out-image {output.warped} --out-affine {output.affine} --out-warp {output.warp} "
        "--out-log-jacobian {output.log_jacobian} --out-difference {output.difference} "
        "--out-displacement {output.displacement} --out-metrics {output.metrics} > {log} 2>&1"


# The follow-up's tumour mask on the baseline grid.
use rule warp_labels as longitudinal_tumor_mask with:
    input:
        labels=anat("mask", label="tumor", desc="preproc"),
        fixed=PLAN.baseline_file(desc="preproc"),
        **xfm("baseline"),
    output:
        anat("mask", space="baseline", label="tumor"),
    log:
        log("longitudinal_tumor_mask"),
    benchmark:
        bench("longitudinal_tumor_mask")


rule tumor_table:
    """Per-subject tumour volumes (whole and per compartment), changes, growth, response category,
    and the registration's volume change checked against the masks'."""
    input:
        masks=PLAN.tumor_masks,
        metrics=PLAN.followup_metrics,
    output:
        layout.tumor_table(OUT, "{subject}"),
    conda:
        CONDA_ENV
    log:
        layout.job_log(OUT, "tumor_table", layout.subject_id("{subject}")),
    benchmark:
        layout.job_benchmark(OUT, "tumor_table", layout.subject_id("{subject}"))
    params:
        sessions=PLAN.tumor_table_sessions,
        pairs=PLAN.followups,
        labels=PLAN.tumor_label_flags(),
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "atlasflow longitudinal table {params.sessions} --pair-sessions {params.pairs} "
        "--pair-metrics {input.metrics} {params.labels} --output {output} > {log} 2>&1"


rule change_map_to_atlas:
    """A follow-up's change map carried into atlas space through its baseline's atlas transform."""
    input:
        image=anat("{change}", space="baseline"),
        atlas=PLAN.atlas,
        **PLAN.baseline_xfm("atlas"),
    output:
        anat("{change}", space="atlas"),
    wildcard_constraints:
        change="|".join(PLAN.change_maps),
    conda:
        CONDA_ENV
    log:
        layout.job_log(OUT, "change_map_to_atlas", PLAN.scan_stem + "_{change}"),
    benchmark:
        layout.job_benchmark(OUT, "change_map_to_atlas", PLAN.scan_stem + "_{change}")
    params:
        interpolation=lambda wc: "nearest" if wc.change.endswith("mask") else "linear",
    resources:
        mem_mb=1500,
        runtime=5,
    shell:
        "atlasflow longitudinal to-atlas --input {input.image} --atlas {input.atlas} --affine {input.affine} "
        "--warp {input.warp} --interpolation {params.interpolation} --output {output} > {log} 2>&1"


# The reference contrast's difference map in atlas space (its name holds the reference's own
# entities, ce- of a post-contrast T1w before space-).
use rule change_map_to_atlas as difference_to_atlas with:
    input:
        image=ref(space="baseline", desc="difference"),
        atlas=PLAN.atlas,
        **PLAN.baseline_xfm("atlas"),
    output:
        ref(space="atlas", desc="difference"),
    log:
        log("difference_to_atlas"),
    benchmark:
        bench("difference_to_atlas")
    params:
        interpolation="linear",


# The baseline's tumour mask in atlas space.
use rule warp_labels as baseline_tumor_to_atlas with:
    input:
        labels=anat("mask", label="tumor", desc="preproc"),
        fixed=PLAN.atlas,
        **xfm("atlas"),
    output:
        anat("mask", space="atlas", label="tumor", desc="baseline"),
    log:
        log("baseline_tumor_to_atlas"),
    benchmark:
        bench("baseline_tumor_to_atlas")


rule tumor_frequency:
    """Share of tumour subjects with tumour at each atlas voxel (latest session with a mask)."""
    input:
        PLAN.tumor_frequency_inputs,
    output:
        layout.tumor_frequency(OUT),
    conda:
        CONDA_ENV
    log:
        layout.job_log(OUT, "atlas", "tumor_frequency"),
    benchmark:
        layout.job_benchmark(OUT, "tumor_frequency")
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "atlasflow longitudinal frequency --masks {input} --output {output} > {log} 2>&1"
