"""Figures and the self-contained HTML report drawn from the experiment store.

``catalog`` pairs every figure with the SQL producing its data, ``figures_*`` draw them
(matplotlib on Agg, imported lazily), ``runset`` picks the runs a report shows, ``summary``
states the findings in numbers, ``render`` fills ``template.html.j2``. The ``report`` stage
(``cwa.stages.report``) ties them together.
"""
