"""Longitudinal tumour monitoring: every follow-up registered to its subject's baseline."""


rule longitudinal_register:
    """Follow-up -> baseline with the tumours excluded; log-Jacobian, difference, displacement maps."""
    input:
        unpack(longitudinal_inputs),
        model=model_input,
    output:
        warped=anat("T1w", space="baseline", desc="warped"),
        **xfm("baseline"),
        log_jacobian=anat("map", space="baseline", desc="logjacobian"),
        difference=anat("T1w", space="baseline", desc="difference"),
        displacement=anat("map", space="baseline", desc="displacement"),
        metrics=anat("xfm", from_="T1w", to="baseline", mode="image", desc="qc", ext="json"),
    conda:
        CONDA_ENV
    log:
        log("longitudinal_register"),
    benchmark:
        bench("longitudinal_register")
    params:
        options=longitudinal_options,
        tumors=lambda wc, input: " ".join(
            f"--{k.replace('_', '-')} {input[k]}" for k in ("baseline_tumor", "followup_tumor") if k in input.keys()
        ),
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
        fixed=lambda wc: anat("T1w", wc.subject, BASELINE[wc.subject], desc="preproc"),
        **xfm("baseline"),
    output:
        anat("mask", space="baseline", label="tumor"),
    log:
        log("longitudinal_tumor_mask"),
    benchmark:
        bench("longitudinal_tumor_mask")


rule tumor_table:
    """Per-subject tumour volumes, changes, growth rate, doubling time and response category."""
    input:
        masks=lambda wc: [row_of(wc.subject, t)["tumor_mask"] for t in SESSIONS[wc.subject] if has(wc.subject, t, "tumor_mask")],
        metrics=lambda wc: [anat("xfm", wc.subject, t, from_="T1w", to="baseline", mode="image", desc="qc", ext="json") for t in SESSIONS[wc.subject][1:]],
    output:
        f"{OUT}/sub-{{subject}}/longitudinal/sub-{{subject}}_tumor.tsv",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/tumor_table/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/tumor_table/sub-{{subject}}.tsv"
    params:
        sessions=lambda wc: " ".join(
            f"--session {t} {row_of(wc.subject, t)['acq_date'] or '-'} {row_of(wc.subject, t)['tumor_mask'] or '-'}"
            for t in SESSIONS[wc.subject]
        ),
        pairs=lambda wc: " ".join(SESSIONS[wc.subject][1:]),
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "atlasflow longitudinal table {params.sessions} --pair-sessions {params.pairs} "
        "--pair-metrics {input.metrics} --output {output} > {log} 2>&1"


rule change_map_to_atlas:
    """A follow-up's change map carried into atlas space through its baseline's atlas transform."""
    input:
        image=f"{OUT}/sub-{{subject}}/ses-{{session}}/anat/sub-{{subject}}_ses-{{session}}_space-baseline_{{change}}.nii.gz",
        atlas=ATLAS_T1W,
        affine=lambda wc: anat("xfm", wc.subject, BASELINE[wc.subject], from_="T1w", to="atlas", mode="image", ext="mat"),
        warp=lambda wc: anat("xfm", wc.subject, BASELINE[wc.subject], from_="T1w", to="atlas", mode="image"),
    output:
        f"{OUT}/sub-{{subject}}/ses-{{session}}/anat/sub-{{subject}}_ses-{{session}}_space-atlas_{{change}}.nii.gz",
    wildcard_constraints:
        change="desc-logjacobian_map|desc-displacement_map|desc-difference_T1w|label-tumor_mask",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/change_map_to_atlas/sub-{{subject}}_ses-{{session}}_{{change}}.log",
    benchmark:
        f"{BENCH}/change_map_to_atlas/sub-{{subject}}_ses-{{session}}_{{change}}.tsv"
    params:
        interpolation=lambda wc: "nearest" if wc.change.endswith("mask") else "linear",
    resources:
        mem_mb=1500,
        runtime=5,
    shell:
        "atlasflow longitudinal to-atlas --input {input.image} --atlas {input.atlas} --affine {input.affine} "
        "--warp {input.warp} --interpolation {params.interpolation} --output {output} > {log} 2>&1"


# The baseline's tumour mask in atlas space.
use rule warp_labels as baseline_tumor_to_atlas with:
    input:
        labels=anat("mask", label="tumor", desc="preproc"),
        fixed=ATLAS_T1W,
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
        tumor_frequency_inputs,
    output:
        f"{ATLAS}/tumor_frequency.nii.gz",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/atlas/tumor_frequency.log",
    benchmark:
        f"{BENCH}/tumor_frequency.tsv"
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "atlasflow longitudinal frequency --masks {input} --output {output} > {log} 2>&1"
