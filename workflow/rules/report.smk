"""HTML reports: a self-contained page per subject, the cohort page, figures for `snakemake --report`."""


rule report_subject:
    """One subject's self-contained HTML report, its QC verdict (JSON) and its figures as PNGs."""
    input:
        subject_report_files,
    output:
        html=report(
            f"{REPORTS}/{layout.subject_page('{subject}')}",
            caption="../report/subject_report.rst",
            category="Subjects",
            subcategory="sub-{subject}",
            labels={"subject": "sub-{subject}", "figure": "report"},
        ),
        qc=f"{REPORTS}/{layout.subject_qc('{subject}')}",
        figures=report(
            directory(f"{REPORTS}/{layout.subject_figures('{subject}')}"),
            patterns=["{name}.png"],
            caption="../report/subject_figures.rst",
            category="Subjects",
            subcategory="sub-{subject}",
            labels={"subject": "sub-{subject}", "figure": "{name}"},
        ),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/report/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/report_subject/sub-{{subject}}.tsv"
    params:
        outdir=lambda wc, output: str(Path(output.html).parent.parent),
        sessions=lambda wc: " ".join(SESSIONS[wc.subject]),
        baseline=lambda wc: BASELINE[wc.subject],
        raw=lambda wc: " ".join(f"{t}={row_of(wc.subject, t)['t1w']}" for t in SESSIONS[wc.subject]),
        qc=QC_FLAGS,
    resources:
        mem_mb=1500,
        runtime=5,
    shell:
        "atlasflow report subject --outdir {params.outdir} --subject {wildcards.subject} --sessions {params.sessions} "
        "--baseline {params.baseline} --raw {params.raw} --out {output.html} --qc-json {output.qc} "
        "--figures-dir {output.figures} {params.qc} > {log} 2>&1"


rule report_cohort:
    """The cohort page: QC table linking the subject pages, failed subjects, atlas, tumour frequency."""
    input:
        qc=[f"{REPORTS}/{layout.subject_qc(s)}" for s in SESSIONS],
        atlas=cohort_report_inputs(OUT, N_ITER, tumour=bool(tumor_frequency_inputs(None))),
    output:
        html=report(COHORT_REPORT, caption="../report/cohort_report.rst", category="Cohort",
                    labels={"figure": "cohort report"}),
        iterations=report(f"{COHORT_FIGURES}/atlas_iterations.png", caption="../report/atlas_iterations.rst",
                          category="Cohort", labels={"figure": "atlas iterations"}),
        convergence=report(f"{COHORT_FIGURES}/atlas_convergence.png",
                           caption="../report/atlas_convergence.rst", category="Cohort",
                           labels={"figure": "atlas convergence"}),
        frequency=report(f"{COHORT_FIGURES}/tumor_frequency.png", caption="../report/tumor_frequency.rst",
                         category="Cohort", labels={"figure": "tumour frequency"}),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/report/cohort.log",
    benchmark:
        f"{BENCH}/report_cohort.tsv"
    params:
        outdir=lambda wc, output: str(Path(output.html).parent.parent),
        iterations=N_ITER,
        scans=SCAN_LIST,
        qc=QC_FLAGS,
        figures=lambda wc, output: str(Path(output.iterations).parent),
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "atlasflow report cohort --outdir {params.outdir} --scans {params.scans} --iterations {params.iterations} "
        "--out {output.html} --figures-dir {params.figures} {params.qc} > {log} 2>&1"


onerror:
    # Under --keep-going a failed subject never reaches report_cohort: write the page anyway, so it
    # lists the failures with the error each job logged.
    shell(f"atlasflow report cohort --outdir {OUT} --scans {SCAN_LIST} --iterations {N_ITER} "
          f"--out {COHORT_REPORT} {QC_FLAGS} || true")
