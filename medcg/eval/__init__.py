"""medcg evaluation: MCQ parsing and accuracy, option likelihood, detection IoU, reports."""
