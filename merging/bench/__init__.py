"""`peft-lab bench merge`: the offline multi-task merging benchmark (`runner`), its suites (`digits`: an MLP on
transformed scikit-learn digits; `text`: MiniLM on text tasks from `text_tasks`) and the perf figures (`perf`)."""
