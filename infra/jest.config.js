// Type checking is done once by `tsc --noEmit` (see test.sh); ts-jest only
// transpiles (tsconfig has isolatedModules), which keeps the tests fast.
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/test'],
  testMatch: ['**/*.test.ts'],
  transform: {
    '^.+\\.tsx?$': 'ts-jest',
  },
};
