"""Run records -> frames -> Pareto front, fits, plots, report, notebook. Never imports training code."""
