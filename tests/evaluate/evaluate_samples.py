"""Small records in each format, shared by the evaluation tests."""

ZSRE = {"subject": "Call the Doctor", "src": "What artist created Call the Doctor?", "rephrase": "Which artist "
        "created Call the Doctor?", "alt": "The X-Files", "answers": ["Sleater-Kinney"], "loc": "nq question: who "
        "sang nice day for a white wedding", "loc_ans": "Billy Idol",
        "portability": {"New Question": "Who starred in it?", "New Answer": "David Duchovny"}}
CF = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
      "subject": "Danielle Darrieux", "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux speaks",
      "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
KE = {"subject": "Epaspidoceras", "target_new": "Noctuidae", "prompt": "Which family does Epaspidoceras belong to?",
      "ground_truth": ["Aspidoceratidae"], "rephrase_prompt": "What family are Epaspidoceras?",
      "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["genus"]},
                                            {"prompt": "Epaspidoceras rank", "ground_truth": [["genus", "gen."]]}]},
      "portability": {"Reasoning": [{"prompt": "Common name of that family?", "ground_truth": "Owlet moths"}]}}
MQ = {"case_id": 1, "requested_rewrite": [
    {"prompt": "{} is a citizen of", "subject": "Fernando Santos", "target_new": {"str": "United Kingdom"},
     "target_true": {"str": "Portugal"}},
    {"prompt": "The head of state in {} is", "subject": "United Kingdom", "target_new": {"str": "Emmerson Mnangagwa"},
     "target_true": {"str": "Elizabeth II"}}],
    "questions": ["Who heads the state where Fernando Santos is a citizen?"], "new_answer": "Emmerson Mnangagwa",
    "new_answer_alias": ["Emmerson Dambudzo Mnangagwa"],
    "new_single_hops": [{"cloze": "Fernando Santos is a citizen of", "answer": "United Kingdom", "answer_alias": ["UK"]},
                        {"cloze": "The head of state in United Kingdom is", "answer": "Emmerson Mnangagwa"}]}
