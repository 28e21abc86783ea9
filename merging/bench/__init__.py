"""`peft-lab bench merge`: the offline multi-task merging benchmark (`runner`), its suites (`digits`: an MLP on
transformed scikit-learn digits, the fast smoke suite; `text`: all-MiniLM-L6-v2 on real text tasks with zero-shot
heads, read from the task files of `text_data`), the merge methods and their grids (`methods`), the tables and
plots (`report`) and the perf figures (`perf`)."""
