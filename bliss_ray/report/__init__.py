"""Reports: tables (rebuttal Tables 1–4 style) and figures (Figures 1–3 style) from run directories alone."""
