"""The reference capture service: one target payrace races, readable in one sitting."""
