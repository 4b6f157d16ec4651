"""The ChestX-ray14 label set, in the order S0 (and the NIH release) uses."""

NIH_LABELS = (
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
)
NO_FINDING = "No Finding"

# Per-image prevalence in the NIH release (Wang et al. 2017, 112,120 images); "No Finding" ≈ 53.8 %.
NIH_PREVALENCE = {
    "Atelectasis": 0.103,
    "Consolidation": 0.042,
    "Infiltration": 0.177,
    "Pneumothorax": 0.047,
    "Edema": 0.021,
    "Emphysema": 0.022,
    "Fibrosis": 0.015,
    "Effusion": 0.119,
    "Pneumonia": 0.013,
    "Pleural_Thickening": 0.030,
    "Cardiomegaly": 0.025,
    "Nodule": 0.056,
    "Mass": 0.052,
    "Hernia": 0.002,
}
