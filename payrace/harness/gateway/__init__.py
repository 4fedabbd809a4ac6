"""The fake Razorpay: its state (fake), its HTTP server (server), the controls the harness
drives (controls), and what Razorpay signs (signing)."""
