"""What a person reads: the run report rendered for the console (rich), Markdown (a PR
comment, the CI job's summary) and one self-contained HTML file with inline SVG plots.

Every renderer reads report.json's content (``Report.to_dict()``) and its ``summary``
section (``pipeline.summary``), never the pipeline's objects, so a report file can be
rendered again later and the formats cannot drift apart.
"""
