"""HTML reports: a self-contained page per subject, the cohort page, figures for `snakemake --report`."""


rule report_subject:
    """One subject's self-contained HTML report, its QC verdict (JSON) and its figures as PNGs."""
    input:
        PLAN.subject_report_files,
    output:
        html=report(
            f"{layout.reports_dir(OUT)}/{layout.subject_page('{subject}')}",
            caption="../report/subject_report.rst",
            category="Subjects",
            subcategory=layout.subject_id("{subject}"),
            labels={"subject": layout.subject_id("{subject}"), "figure": "report"},
        ),
        qc=f"{layout.reports_dir(OUT)}/{layout.subject_qc('{subject}')}",
        figures=report(
            directory(f"{layout.reports_dir(OUT)}/{layout.subject_figures('{subject}')}"),
            patterns=[layout.figure_file("{name}")],
            caption="../report/subject_figures.rst",
            category="Subjects",
            subcategory=layout.subject_id("{subject}"),
            labels={"subject": layout.subject_id("{subject}"), "figure": "{name}"},
        ),
    conda:
        CONDA_ENV
    log:
        layout.job_log(OUT, "report", layout.subject_id("{subject}")),
    benchmark:
        layout.job_benchmark(OUT, "report_subject", layout.subject_id("{subject}"))
    params:
        outdir=lambda wc, output: str(Path(output.html).parent.parent),
        sessions=PLAN.subject_sessions,
        baseline=PLAN.subject_baseline,
        raw=PLAN.raw_scans,
        qc=PLAN.qc_flags,
        contrasts=PLAN.contrasts.report_flags,
        reference=PLAN.reference_flag,
    resources:
        mem_mb=1500,
        runtime=5,
    shell:
        "atlasflow report subject --outdir {params.outdir} --subject {wildcards.subject} --sessions {params.sessions} "
        "--baseline {params.baseline} --raw {params.raw} --out {output.html} --qc-json {output.qc} "
        "--figures-dir {output.figures} {params.qc} {params.contrasts}{params.reference} > {log} 2>&1"


rule report_cohort:
    """The cohort page: QC table linking the subject pages, failed subjects, atlas, tumour frequency."""
    input:
        qc=[f"{layout.reports_dir(OUT)}/{layout.subject_qc(s)}" for s in PLAN.sessions],
        atlas=PLAN.cohort_report_inputs(),
        skipped=layout.skipped_inputs(OUT),
    output:
        html=report(layout.cohort_page(OUT), caption="../report/cohort_report.rst", category="Cohort",
                    labels={"figure": "cohort report"}),
        iterations=report(layout.cohort_figure(OUT, "atlas_iterations"), caption="../report/atlas_iterations.rst",
                          category="Cohort", labels={"figure": "atlas iterations"}),
        convergence=report(layout.cohort_figure(OUT, "atlas_convergence"),
                           caption="../report/atlas_convergence.rst", category="Cohort",
                           labels={"figure": "atlas convergence"}),
        frequency=report(layout.cohort_figure(OUT, "tumor_frequency"), caption="../report/tumor_frequency.rst",
                         category="Cohort", labels={"figure": "tumour frequency"}),
    conda:
        CONDA_ENV
    log:
        layout.job_log(OUT, "report", "cohort"),
    benchmark:
        layout.job_benchmark(OUT, "report_cohort")
    params:
        outdir=lambda wc, output: str(Path(output.html).parent.parent),
        iterations=PLAN.n_iter,
        scans=PLAN.scan_list,
        qc=PLAN.qc_flags,
        figures=lambda wc, output: str(Path(output.iterations).parent),
        reference=PLAN.reference_flag,
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "atlasflow report cohort --outdir {params.outdir} --scans {params.scans} --iterations {params.iterations} "
        "--out {output.html} --figures-dir {params.figures} {params.qc}{params.reference} > {log} 2>&1"


onerror:
    # Under --keep-going a failed subject never reaches report_cohort: write the page anyway, so it
    # lists the failures with the error each job logged.
    # It runs in Snakemake's own process and environment (no rule's conda environment): its Python.
    shell(f"{ATLASFLOW} report cohort --outdir {OUT} --scans {PLAN.scan_list} --iterations {PLAN.n_iter} "
          f"--out {layout.cohort_page(OUT)} {PLAN.qc_flags}{PLAN.reference_flag} || true")
